"""Task B of the collapse study, a support squeeze: the mechanism APO targets, built in (docs/science.md, v2).

Each prompt is a category (`q137:`); an answer is `answer_len` words (`w017 w203 w310`) from a vocabulary of
`vocab_words` word tokens, so wrong responses share valid prefixes. At every position j a category has its own
`top_size` "top" words (the reference's Top-K at that branch: `top_mass` of the mass), `tail_size` category tail
words, and the position's global **attractor** word `att_j` (one word shared by every category):
  * **hard** category: the valid words at j are `valid_top_hard` of the top words; the attractor is wrong and
    sits far down the tail (`hard_attractor_mass`), outside the reference Top-K;
  * **easy** category: the valid words are `valid_top_easy` of the top words *and* the attractor, which the
    behaviour policy uses often (`easy_attractor_mass`).
RL on the trained half rewards the attractor in easy categories at every position; the shared weights spill it
into hard ones, where it is outside the reference Top-K: the policy's mass leaves the support (Top-K) that holds
every valid continuation. APO's pull on wrong responses points back into that Top-K.

The reference is SFT'd on demonstrations from the behaviour policy (positions drawn independently). Every valid
set is listed in the ground truth (rewards/squeeze.py), so exact evaluation and coverage are measurable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_apo.config import InputError
from megatron_apo.rewards.squeeze import SQUEEZE_DATA_SOURCE

SPLITS = ("trained_easy", "trained_hard", "heldout_easy", "heldout_hard")


@dataclass(frozen=True)
class SqueezeTaskConfig:
    num_categories: int = 192
    hard_fraction: float = 0.5
    vocab_words: int = 480
    answer_len: int = 3
    top_size: int = 6
    tail_size: int = 12
    top_mass: float = 0.7  # hard categories: reference mass on the top words (the Top-K holds ~this + 2 tail words)
    valid_top_hard: int = 3
    valid_top_easy: int = 2
    easy_attractor_mass: float = 0.25
    hard_attractor_mass: float = 0.005
    seed: int = 0

    def __post_init__(self):
        if not 4 <= self.num_categories <= 999:
            raise InputError(f"task.num_categories={self.num_categories}: must be in [4, 999] (three-digit ids)")
        if not 1 <= self.valid_top_easy <= self.top_size or not 1 <= self.valid_top_hard <= self.top_size:
            raise InputError(f"task.valid_top_easy / valid_top_hard must be in [1, top_size={self.top_size}]")
        if self.vocab_words < self.answer_len + self.top_size + self.tail_size:
            raise InputError(f"task.vocab_words={self.vocab_words}: too small for top_size + tail_size words")
        if self.answer_len < 1:
            raise InputError(f"task.answer_len={self.answer_len}: must be >= 1")
        for key in ("hard_fraction", "top_mass", "easy_attractor_mass", "hard_attractor_mass"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise InputError(f"task.{key}={getattr(self, key)}: must be in (0, 1)")
        if self.top_mass + self.easy_attractor_mass >= 1.0:
            raise InputError("task.top_mass + task.easy_attractor_mass must be < 1 (the tail keeps some mass)")


def word(i: int) -> str:
    return f"w{i:03d}"


def attractor(j: int) -> str:
    """Position j's attractor: the first answer_len words of the vocabulary."""
    return word(j)


@dataclass(frozen=True)
class SqueezeCategory:
    index: int
    hard: bool
    trained: bool
    valid: tuple[tuple[str, ...], ...]  # per position, the valid words
    dists: tuple[tuple[tuple[str, float], ...], ...]  # per position, the behaviour policy: (word, probability)

    @property
    def prompt(self) -> str:
        return f"q{self.index:03d}:"

    @property
    def split(self) -> str:
        return f"{'trained' if self.trained else 'heldout'}_{'hard' if self.hard else 'easy'}"

    @property
    def ground_truth(self) -> str:
        return ";".join("|".join(v) for v in self.valid)


def make_squeeze_categories(cfg: SqueezeTaskConfig) -> list[SqueezeCategory]:
    """The task, a pure function of the config; hard categories and the RL half are stratified draws."""
    rng = random.Random(cfg.seed)
    n_hard = round(cfg.num_categories * cfg.hard_fraction)
    order = list(range(cfg.num_categories))
    rng.shuffle(order)
    hard = set(order[:n_hard])
    trained = set(order[: n_hard // 2]) | set(order[n_hard: n_hard + (cfg.num_categories - n_hard) // 2])
    pool = [word(i) for i in range(cfg.answer_len, cfg.vocab_words)]  # every word but the attractors
    cats = []
    for c in range(cfg.num_categories):
        valid, dists = [], []
        for j in range(cfg.answer_len):
            words = rng.sample(pool, cfg.top_size + cfg.tail_size)
            top, tail = words[:cfg.top_size], words[cfg.top_size:]
            att = attractor(j)
            if c in hard:
                ok = top[:cfg.valid_top_hard]
                att_mass = cfg.hard_attractor_mass
            else:
                ok = top[:cfg.valid_top_easy] + [att]
                att_mass = cfg.easy_attractor_mass
            top_mass = cfg.top_mass if c in hard else min(cfg.top_mass, 1.0 - att_mass - 0.05)
            tail_mass = 1.0 - top_mass - att_mass
            dist = [(w, top_mass / cfg.top_size) for w in top] + [(w, tail_mass / cfg.tail_size) for w in tail]
            valid.append(tuple(ok))
            dists.append(tuple(dist + [(att, att_mass)]))
        cats.append(SqueezeCategory(c, c in hard, c in trained, tuple(valid), tuple(dists)))
    return cats


def squeeze_row(cat: SqueezeCategory, index: int) -> dict:
    return {
        "data_source": f"{SQUEEZE_DATA_SOURCE}/{cat.split}",
        "prompt": [{"role": "user", "content": cat.prompt}],
        "ability": "toy",
        "reward_model": {"ground_truth": cat.ground_truth, "style": "rule"},
        "extra_info": {"index": index, "category": cat.index, "split": cat.split},
    }


def squeeze_train_rows(cats: list[SqueezeCategory]) -> list[dict]:
    return [squeeze_row(c, i) for i, c in enumerate(c for c in cats if c.trained)]


def squeeze_eval_rows(cats: list[SqueezeCategory]) -> list[dict]:
    return [squeeze_row(c, i) for i, c in enumerate(cats)]


def squeeze_sft_pairs(cats: list[SqueezeCategory], per_category: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) demonstrations: each position drawn from the category's behaviour policy."""
    rng = random.Random(seed)
    pairs = []
    for c in cats:
        for _ in range(per_category):
            ws = [rng.choices([w for w, _ in d], weights=[p for _, p in d])[0] for d in c.dists]
            pairs.append((c.prompt, " ".join(ws)))
    return pairs


def squeeze_behaviour_valid_prob(cat: SqueezeCategory) -> float:
    p = 1.0
    for ok, d in zip(cat.valid, cat.dists):
        p *= sum(q for w, q in d if w in ok)
    return p


def reference_topk_mass(cat: SqueezeCategory, k: int) -> list[float]:
    """Per position: the behaviour policy's mass on its Top-k words (the design's 60-85% at hard branches)."""
    return [sum(sorted((q for _, q in d), reverse=True)[:k]) for d in cat.dists]


def vocabulary_lines(cats: list[SqueezeCategory], cfg: SqueezeTaskConfig) -> list[str]:
    """Lines that hold every word and prompt once (the word tokenizer's training text)."""
    return [" ".join(word(i) for i in range(cfg.vocab_words))] + [c.prompt for c in cats]


__all__ = ["SPLITS", "SqueezeCategory", "SqueezeTaskConfig", "attractor", "make_squeeze_categories",
           "reference_topk_mass", "squeeze_behaviour_valid_prob", "squeeze_eval_rows", "squeeze_row",
           "squeeze_sft_pairs", "squeeze_train_rows", "vocabulary_lines", "word"]
