"""Find the last `\\boxed{...}` in a model response, with nested braces, in one linear pass.

No regular expressions: a backtracking regex over a 100 kB adversarial string is exactly the kind of
hang a reward must not have, and a C-level regex cannot be interrupted by a signal.
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or `\\boxed x` up to a space/`$`.

    Returns None when there is no complete box (none at all, or the last one is never closed).
    """
    if not text:
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while start >= 0:
        content = _box_content_at(text, start)
        if content is not None:
            return content
        # The last box is unterminated: fall back to the previous complete one.
        start = max(text.rfind(cmd, 0, start) for cmd in _BOX_COMMANDS)
    return None


def _box_content_at(text: str, start: int) -> str | None:
    cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    i = start + len(cmd)
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None
    if i < len(text) and text[i] == " ":  # `\boxed 5`: the token after the space
        rest = text[i + 1 :].lstrip(" ")
        end = 0
        while end < len(rest) and rest[end] not in " $\n":
            end += 1
        return rest[:end] or None
    return None
