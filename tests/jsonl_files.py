"""Test inputs as JSONL files (shared by conftest's `prepared_prefix` and the prepare tests)."""
import json


def write_jsonl(path, records) -> str:
    """`records` as JSONL at `path`: dicts as JSON, strings written as they are (bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)
