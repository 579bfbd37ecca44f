"""A toy task on which GRPO's sharpening turns into collapse through shared parameters (docs/science.md).

Each prompt is a category (`"c37:"`); the answer is a two-character code: a first letter, then a digit.
  * `a` is the popular first letter: in an **easy** category three `a<digit>` codes are valid, and two
    codes with rarer letters;
  * in a **hard** category no `a` code is valid: only three codes with rarer letters are.
The reference policy is made by SFT on demonstrations from a behaviour policy that overuses `a` everywhere:
in easy categories 60% valid `a` codes and 40% rare-letter attempts with a random digit (mostly wrong); in
hard categories `hard_popular_mass` (70%) `a<random digit>` (always wrong) and the rest valid rare codes. So
the reference finds hard categories' answers with probability ~0.3.

RL runs on the `trained` half of the categories. There `a` earns reward in easy categories far more often
than the rare letters, so GRPO raises p(`a`); the shared weights carry that into the `heldout` half, where in
hard categories `a` is always wrong: their p(valid) and pass@n fall (Recursive Space Contraction). The rows'
data sources name the split (`toy_code/trained_easy`, `toy_code/heldout_hard`, ...) so pass@k comes per split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_apo.config import InputError
from megatron_apo.rewards.codes import CODE_DATA_SOURCE

POPULAR = "a"
RARE_LETTERS = "bcdefghijklmnop"
DIGITS = "0123456789"
SPLITS = ("trained_easy", "trained_hard", "heldout_easy", "heldout_hard")


@dataclass(frozen=True)
class CodeTaskConfig:
    num_categories: int = 96
    hard_fraction: float = 0.3
    easy_popular_mass: float = 0.6  # demonstrations: share of valid `a` codes in easy categories
    hard_popular_mass: float = 0.7  # demonstrations: share of (invalid) `a` codes in hard categories
    seed: int = 0

    def __post_init__(self):
        if not 4 <= self.num_categories <= 999:
            raise InputError(f"task.num_categories={self.num_categories}: must be in [4, 999] (ids up to three digits)")
        for key in ("hard_fraction", "easy_popular_mass", "hard_popular_mass"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise InputError(f"task.{key}={getattr(self, key)}: must be in (0, 1)")


@dataclass(frozen=True)
class Category:
    index: int
    hard: bool
    trained: bool
    valid: tuple[str, ...]  # the valid codes
    demos: tuple[tuple[str, float], ...]  # the behaviour policy the reference is SFT'd on: (code, probability)

    @property
    def prompt(self) -> str:
        return f"c{self.index:02d}:"

    @property
    def split(self) -> str:
        return f"{'trained' if self.trained else 'heldout'}_{'hard' if self.hard else 'easy'}"


def make_categories(cfg: CodeTaskConfig) -> list[Category]:
    """The task, a pure function of the config: hard categories and the RL half are stratified draws."""
    rng = random.Random(cfg.seed)
    n_hard = round(cfg.num_categories * cfg.hard_fraction)
    order = list(range(cfg.num_categories))
    rng.shuffle(order)
    hard = set(order[:n_hard])
    # half of the hard and half of the easy categories are trained on
    trained = set(order[: n_hard // 2]) | set(order[n_hard : n_hard + (cfg.num_categories - n_hard) // 2])
    cats = []
    for i in range(cfg.num_categories):
        if i in hard:
            letters = rng.sample(RARE_LETTERS, 3)
            valid = tuple(f"{letter}{rng.choice(DIGITS)}" for letter in letters)
            demos = [(f"{POPULAR}{d}", cfg.hard_popular_mass / 10) for d in DIGITS]
            demos += [(c, (1 - cfg.hard_popular_mass) / 3) for c in valid]
        else:
            a_codes = [f"{POPULAR}{d}" for d in rng.sample(DIGITS, 3)]
            letters = rng.sample(RARE_LETTERS, 2)
            rare = [f"{letter}{rng.choice(DIGITS)}" for letter in letters]
            valid = tuple(a_codes + rare)
            demos = [(c, cfg.easy_popular_mass / 3) for c in a_codes]
            # rare-letter attempts: the letter is right, the digit a guess (valid 1 time in 10)
            demos += [(f"{letter}{d}", (1 - cfg.easy_popular_mass) / 20) for letter in letters for d in DIGITS]
        cats.append(Category(i, i in hard, i in trained, valid, tuple(demos)))
    return cats


def category_row(cat: Category, index: int) -> dict:
    """One verl-schema row; the data source names the split."""
    return {
        "data_source": f"{CODE_DATA_SOURCE}/{cat.split}",
        "prompt": [{"role": "user", "content": cat.prompt}],
        "ability": "toy",
        "reward_model": {"ground_truth": ",".join(cat.valid), "style": "rule"},
        "extra_info": {"index": index, "category": cat.index, "split": cat.split},
    }


def train_rows(cats: list[Category]) -> list[dict]:
    return [category_row(c, i) for i, c in enumerate(c for c in cats if c.trained)]


def eval_rows(cats: list[Category]) -> list[dict]:
    """Every category once (trained and held-out), for pass@k at large n."""
    return [category_row(c, i) for i, c in enumerate(cats)]


def sft_pairs(cats: list[Category], per_category: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, code) demonstrations drawn from each category's behaviour policy."""
    rng = random.Random(seed)
    pairs = []
    for c in cats:
        codes, weights = zip(*c.demos)
        pairs += [(c.prompt, code) for code in rng.choices(codes, weights=weights, k=per_category)]
    return pairs


def behaviour_valid_prob(cat: Category) -> float:
    """p(valid) of the behaviour policy the reference imitates."""
    ok = set(cat.valid)
    return sum(p for code, p in cat.demos if code in ok)


__all__ = ["CodeTaskConfig", "Category", "SPLITS", "behaviour_valid_prob", "category_row", "eval_rows",
           "make_categories", "sft_pairs", "train_rows"]
