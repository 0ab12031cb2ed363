"""BABILong-style probes: the sentences of a bAbI story scattered through distractor text, a
question at the end whose answer needs those facts.

Why: BABILong (Kuratov et al., 2024) measures reasoning over facts spread across very long
inputs, which single-needle retrieval (data/synthetic.py) does not. Like the benchmark, the
story's key supporting fact sits at a chosen depth of the context; earlier story sentences come
before it, later ones after. The distractor text is a seeded generator of plain sentences
(offline) or any text passed as `haystack` (e.g. a PG-19 book, as the benchmark uses).

Tasks: qa1 single supporting fact ("Where is Mary?"), qa2 two supporting facts ("Where is the
apple?" after someone picked it up and moved), qa6 yes/no ("Is Mary in the kitchen?").
A sample is a pure function of (seed, length, task, depth, haystack). Lengths are in bytes,
i.e. exact for the byte tokenizer; the prompt ends with the answer so an LM is scored on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data.tokenizers import ByteTokenizer

TASKS = ("qa1", "qa2", "qa6")
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Fred", "Bill", "Julie", "Emily")
PLACES = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway", "cellar", "park")
OBJECTS = ("apple", "football", "milk", "key", "box", "book")
VERBS = ("went to", "moved to", "journeyed to", "travelled to")
_MOVE_RE = re.compile(rb"(\w+) (?:went to|moved to|journeyed to|travelled to) the (\w+)\.")
_TAKE_RE = re.compile(rb"(\w+) (?:picked up|got|grabbed) the (\w+)\.")

_ADJ = ("old", "quiet", "distant", "bright", "narrow", "heavy", "silent", "golden", "small")
_NOUN = ("captain", "village", "letter", "river", "window", "merchant", "storm", "road", "lamp")
_VERB = ("waited by", "looked at", "spoke of", "walked past", "thought about", "remembered")
_TIME = ("at dawn", "in the evening", "for a while", "again", "without a word", "that winter")


@dataclass(frozen=True)
class BabiSample:
    """One probe: `prompt` (context + question + answer, exactly `length` bytes)."""

    prompt: bytes
    answer: str
    answer_start: int  # byte offset of the answer in `prompt`
    question: str
    facts: tuple[str, ...]  # story sentences in order
    supporting: tuple[int, ...]  # indices into `facts` the answer needs
    fact_offsets: tuple[int, ...]  # byte offset of each fact in `prompt`
    depth: float  # where the key (last) supporting fact was asked to sit, fraction of context
    task: str


def _filler(rng: np.random.Generator, n: int, haystack: bytes | None) -> bytes:
    """`n` bytes of distractor text, cut at a UTF-8 character boundary and padded."""
    if haystack:
        start = int(rng.integers(len(haystack)))
        reps = (start + n) // len(haystack) + 2
        text = (haystack * reps)[start : start + n]
    else:
        parts, size = [], 0
        while size < n:
            a, b = (int(x) for x in rng.integers(len(_ADJ), size=2))
            c, d = (int(x) for x in rng.integers(len(_NOUN), size=2))
            v, t = int(rng.integers(len(_VERB))), int(rng.integers(len(_TIME)))
            s = f"The {_ADJ[a]} {_NOUN[c]} {_VERB[v]} the {_ADJ[b]} {_NOUN[d]} {_TIME[t]}. "
            parts.append(s.encode())
            size += len(parts[-1])
        text = b"".join(parts)[:n]
    cut = text.decode("utf-8", errors="ignore").encode()
    return cut + b" " * (n - len(cut))


def _story(
    rng: np.random.Generator, task: str, n_facts: int
) -> tuple[list[str], list[int], str, str]:
    """(facts, supporting indices, question, answer); the last supporting fact is the key."""
    people = [PEOPLE[i] for i in rng.permutation(len(PEOPLE))[:4]]
    where: dict[str, str] = {}
    facts, movers = [], []
    pickup = int(rng.integers(0, n_facts - 1)) if task == "qa2" else -1
    holder, obj = people[0], OBJECTS[int(rng.integers(len(OBJECTS)))]
    for i in range(n_facts):
        if i == pickup:
            facts.append(f"{holder} picked up the {obj}.")
            movers.append(None)
            continue
        p = holder if (task == "qa2" and i == n_facts - 1) else people[int(rng.integers(4))]
        choices = [x for x in PLACES if x != where.get(p)]
        where[p] = choices[int(rng.integers(len(choices)))]
        facts.append(f"{p} {VERBS[int(rng.integers(len(VERBS)))]} the {where[p]}.")
        movers.append(p)
    if task == "qa2":
        key = max(i for i, m in enumerate(movers) if m == holder and i > pickup)
        return facts, [pickup, key], f"Where is the {obj}?", where[holder]
    moved = sorted(set(m for m in movers if m is not None))
    who = moved[int(rng.integers(len(moved)))]
    key = max(i for i, m in enumerate(movers) if m == who)
    if task == "qa1":
        return facts, [key], f"Where is {who}?", where[who]
    yes = bool(rng.integers(2))
    place = where[who] if yes else [x for x in PLACES if x != where[who]][int(rng.integers(7))]
    return facts, [key], f"Is {who} in the {place}?", "yes" if yes else "no"


def make_babilong(
    length: int,
    *,
    seed: int,
    task: str = "qa1",
    depth: float = -1.0,
    num_facts: int = 8,
    haystack: str | bytes | None = None,
) -> BabiSample:
    """A probe of exactly `length` bytes; `depth` in [0, 1] places the key supporting fact at
    that fraction of the context (negative: drawn uniformly from the seed)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; expected one of {TASKS}")
    if num_facts < 2:
        raise ValueError(f"num_facts={num_facts}; expected >= 2")
    if depth > 1:
        raise ValueError(f"depth={depth}; expected a fraction in [0, 1] or negative")
    rng = np.random.default_rng([seed, TASKS.index(task), length, num_facts])
    facts, support, question, answer = _story(rng, task, num_facts)
    d = float(rng.random()) if depth < 0 else depth
    key = support[-1]
    fact_b = [f.encode() + b" " for f in facts]
    tail = f"\nQuestion: {question}\nAnswer: ".encode()
    n_fill = length - sum(len(f) for f in fact_b) - len(tail) - len(answer)
    if n_fill < 0:
        need = length - n_fill
        raise ValueError(f"length={length} is too short for {num_facts} {task} facts (>= {need})")
    hay = haystack.encode() if isinstance(haystack, str) else haystack
    filler = _filler(rng, n_fill, hay)
    # Fractions of the filler: the key fact at d, earlier facts before it, later ones after.
    before = np.sort(rng.random(key)) * d
    after = d + np.sort(rng.random(len(facts) - key - 1)) * (1 - d)
    cuts = [_snap(filler, int(round(f * n_fill))) for f in [*before, d, *after]]
    cuts = np.maximum.accumulate(cuts).tolist()  # snapping must keep the story order
    out, offsets, prev = [], [], 0
    for cut, fb in zip(cuts, fact_b):
        out.append(filler[prev:cut])
        offsets.append(sum(len(x) for x in out))
        out.append(fb)
        prev = cut
    out.append(filler[prev:])
    prompt = b"".join(out) + tail + answer.encode()
    assert len(prompt) == length
    return BabiSample(
        prompt,
        answer,
        length - len(answer),
        question,
        tuple(facts),
        tuple(support),
        tuple(offsets),
        d,
        task,
    )


def _snap(filler: bytes, pos: int) -> int:
    """Move `pos` back to just after a sentence end when one is near, else after a space, so
    text stays readable and no fact is glued to a word."""
    dot = filler.rfind(b". ", 0, pos)
    if dot >= 0 and pos - dot < 200:
        return dot + 2
    space = filler.rfind(b" ", 0, pos)
    return space + 1 if space >= 0 else 0


def solve(prompt: bytes) -> dict[str, str]:
    """Where everyone and everything is after reading `prompt`'s story (a checker for tests
    and for scoring generated prompts)."""
    where: dict[str, str] = {}
    held: dict[str, str] = {}
    events = sorted(
        [(m.start(), "move", m) for m in _MOVE_RE.finditer(prompt)]
        + [(m.start(), "take", m) for m in _TAKE_RE.finditer(prompt)],
        key=lambda x: x[0],
    )
    for _, kind, m in events:
        a, b = m.group(1).decode(), m.group(2).decode()
        if kind == "move":
            where[a] = b
        else:
            held[b] = a
    return where | {obj: where.get(p, "nowhere") for obj, p in held.items()}


def babilong_sample_fn(
    length: int, *, seed: int, task: str = "qa1", depth: float = -1.0
) -> Callable[[int], dict[str, np.ndarray]]:
    """Sample function for data.base.IndexedLoader: `tokens` (length,) and `loss_mask`
    (length - 1,) that scores only the answer tokens."""
    tok = ByteTokenizer()

    def sample(i: int) -> dict[str, np.ndarray]:
        s = make_babilong(length, seed=seed * 1_000_003 + i, task=task, depth=depth)
        mask = np.zeros(length - 1, dtype=np.float32)
        mask[s.answer_start - 1 :] = 1.0  # loss_mask[t] weighs target t + 1
        return {"tokens": tok.encode(s.prompt).astype(np.int64), "loss_mask": mask}

    return sample
