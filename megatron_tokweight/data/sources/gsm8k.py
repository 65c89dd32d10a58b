"""GSM8K as two tasks from one source: worked solutions (long answers) and final answers (short ones).

Each `{"question", "answer"}` line (the answer is a worked solution ending in `#### <final>`)
becomes two prompt/response lines sharing a group (the same question):

- task "gsm8k_solution": response = the solution as a "rationale" span, then the `#### <final>`
  line as an "answer" span;
- task "gsm8k_answer": response = the final answer alone.

The two prompts end with different instructions so the model can tell which output is wanted.
The solution text (calculator annotations `<<...>>` included) is kept verbatim.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_tokweight.common.files import atomic_file
from megatron_tokweight.data.jsonl_shapes import JsonlReader
from megatron_tokweight.errors import DataFormatError

SOLUTION_TASK = "gsm8k_solution"
ANSWER_TASK = "gsm8k_answer"
SOLUTION_INSTRUCTION = "Solve step by step, then give the final answer after ####."
ANSWER_INSTRUCTION = "Give only the final answer."
FINAL_MARKER = "####"


def split_solution(answer: str, where: str):
    """`"...steps...\\n#### 72"` -> ("...steps...\\n", "#### 72", "72")."""
    cut = answer.rfind(FINAL_MARKER)
    if cut < 0:
        raise DataFormatError(f"{where}: field 'answer': no {FINAL_MARKER!r} line with the final answer")
    final = answer[cut + len(FINAL_MARKER):].strip()
    if not final:
        raise DataFormatError(f"{where}: field 'answer': nothing after {FINAL_MARKER!r}")
    return answer[:cut], answer[cut:].rstrip(), final


def write_gsm8k_two_task_jsonl(src_jsonl, out_jsonl) -> int:
    """Convert GSM8K `src_jsonl` into prompt/response `out_jsonl` (two lines per question); returns questions."""
    reader = JsonlReader(src_jsonl)
    group_prefix = Path(src_jsonl).stem
    out_jsonl = os.fspath(out_jsonl)
    count = 0
    with atomic_file(out_jsonl, "w", encoding="utf-8") as out:
        for line_no, obj in reader:
            where = f"{reader.path}:{line_no}"
            for key in ("question", "answer"):
                if not isinstance(obj.get(key), str):
                    problem = "missing" if key not in obj else "expected a string"
                    raise DataFormatError(f"{where}: field {key!r}: {problem}")
            rationale, final_line, final = split_solution(obj["answer"], where)
            group = f"{group_prefix}:{line_no}"
            question = obj["question"].strip()
            solution = {
                "task": SOLUTION_TASK,
                "group": group,
                "prompt": f"{question}\n{SOLUTION_INSTRUCTION}",
                "response": [{"text": rationale, "kind": "rationale"}, {"text": final_line, "kind": "answer"}],
            }
            short = {"task": ANSWER_TASK, "group": group, "prompt": f"{question}\n{ANSWER_INSTRUCTION}", "response": final}
            out.write(json.dumps(solution, ensure_ascii=False) + "\n")
            out.write(json.dumps(short, ensure_ascii=False) + "\n")
            count += 1
    return count
