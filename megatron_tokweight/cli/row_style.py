"""What `tokweight inspect` shows, shared by the terminal (`cli.inspect`) and the page
(`cli.inspect_html`) so both agree: the heat-map colours of weights and the titles of rows,
samples and padding."""

# the heat map, from weight 0 to the largest weight shown (yellow-orange-red, legible on both ends)
HEAT_STOPS = ((255, 247, 188), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38))
PROMPT_COLOR = (105, 105, 105)  # on the page's white: 5.4:1, still apart from black
# a terminal may be dark or light: a middle grey reads about 4:1 on either
TERMINAL_PROMPT_COLOR = (128, 128, 128)
# a newline or tab inside a token is shown as a mark too, so a trained one is visible
VISIBLE = {"\n": "\u21b5\n", "\t": "\u21e5\t", "\r": "\u240d"}
INLINE = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d", " ": "\u2423"}


def heat_rgb(weight: float, top: float):
    """The heat-map colour of `weight` on the scale [0, top] (linear between HEAT_STOPS)."""
    t = 0.0 if top <= 0 else min(max(weight / top, 0.0), 1.0)
    x = t * (len(HEAT_STOPS) - 1)
    i = min(int(x), len(HEAT_STOPS) - 2)
    a, b = HEAT_STOPS[i], HEAT_STOPS[i + 1]
    return tuple(round(p + (q - p) * (x - i)) for p, q in zip(a, b))


def ink_rgb(background):
    """Black or white text, whichever reads better on `background` (relative luminance)."""
    r, g, b = (c / 255.0 for c in background)
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else (255, 255, 255)


def top_weight(views) -> float:
    """The largest target weight among `views` (the top of the heat-map scale)."""
    return max((float(v.target_weight.max()) for v in views if len(v.target_weight)), default=0.0)


def shown(text: str, inline: bool = False) -> str:
    """`text` with its newlines and tabs marked (`inline`, for a table cell: the marks only, and
    spaces as open boxes so a token of spaces is seen)."""
    if inline:
        return "".join(INLINE.get(c, c) for c in text)
    return "".join(VISIBLE.get(c, c) for c in text)


def row_title(view) -> str:
    """'row 3 (pack row 9): 2 samples, 118 of 128 positions real, 10 padding (2 of it CP)'."""
    pad = view.seq_length - view.real_tokens
    cp = sum(s.end - s.start - s.real for s in view.samples)
    samples = f"{len(view.samples)} sample{'' if len(view.samples) == 1 else 's'}"
    return (f"row {view.index} (pack row {view.pack_row}): {samples}, {view.real_tokens:,} of "
            f"{view.seq_length:,} positions real, {pad:,} padding" + (f" ({cp:,} of it CP)" if cp else ""))


def segment_title(segment) -> str:
    """'sample 17 | task qa | n 42 | weight 0.6172 | positions 0-95' (+ the part of a truncated or split sample, the CP padding)."""
    parts = [f"sample {segment.sample}", f"task {segment.task}", f"n {segment.n:,}",
             f"weight {segment.weight:.4g}", f"positions {segment.start}-{segment.start + segment.real - 1}"]
    if segment.is_partial:
        parts.append(f"partial: tokens {segment.offset}-{segment.offset + segment.real - 1} "
                     f"of {segment.sample_length:,}")
    if segment.end - segment.start > segment.real:
        parts.append(f"+{segment.end - segment.start - segment.real} CP padding")
    return " | ".join(parts)


def padding_title(segment) -> str:
    return f"{segment.end - segment.start:,} padding positions ({segment.start}-{segment.end - 1})"
