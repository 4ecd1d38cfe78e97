"""
synthetic: a corpus generated offline in seconds, for machines without internet access and for the tests.
Stories with consistent characters (pronouns follow the name), towns with fixed facts, counting, days of the
week and arithmetic, plus worksheets of sums: structure that a small model can learn. Train and val come from
separate generator seeds.
"""

import itertools
import random

from autoresearch.cachefiles import FORMAT_VERSION, load_manifest, shard_name, write_dataset

SYNTHETIC_DOCS = {"train": 5000, "val": 500}  # ~7 MB + 0.7 MB of text
SYNTHETIC_SEEDS = {"train": 1, "val": 2}

# ---------------------------------------------------------------------------
# Vocabulary and the fixed facts shared by every document

SYL = "ka lo mi ra to su ne pa di vo la be ri mo ta fi no se gu ha zo ve".split()
KINDS = "child fox rabbit robot farmer baker dragon sailor owl painter knight".split()
ADJS = "little brave quiet clever happy sleepy curious kind tall tiny old young".split()
COLORS = "red blue green yellow purple orange white black silver golden".split()
ANIMALS = "cat dog bird frog horse goat duck mouse turtle pony".split()
ITEMS = "apples stones books coins shells cookies flowers pencils eggs marbles".split()
FOODS = "soup bread cheese honey rice pie plums noodles berries cake".split()
SPOTS = "market forest river hill garden library beach bridge tower farm".split()
THINGS = "lamp key map box drum hat kite ring boat bell".split()
FURNITURE = "table bed chair shelf door window rug stairs".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _places():
    """Fixed facts shared by every document (seed 0): each town has one river color and one favourite food."""
    rng = random.Random(0)
    names = sorted({(rng.choice(SYL) + rng.choice(SYL)).capitalize() + rng.choice(["ton", "vale", "ford", "by"])
                    for _ in range(40)})
    return {name: (rng.choice(COLORS), rng.choice(FOODS)) for name in names}


PLACES = _places()

# ---------------------------------------------------------------------------
# Documents: stories about named characters in those towns, and arithmetic worksheets


def synthetic_name(rng):
    name = "".join(rng.choice(SYL) for _ in range(rng.choice((2, 2, 3)))).capitalize()
    # pronouns follow the last letter, a rule a model can pick up
    return name, ("she", "her", "She") if name[-1] in "aei" else ("he", "his", "He")


def synthetic_story(rng):
    hero, (he, his, He) = synthetic_name(rng)
    pet = rng.choice(ANIMALS)
    friend, _ = synthetic_name(rng)
    town = rng.choice(list(PLACES))
    river, food = PLACES[town]
    day = rng.randrange(7)
    out = [f"Once upon a time, there was a {rng.choice(ADJS)} {rng.choice(KINDS)} named {hero} who lived in {town}.",
           f"{He} had a {rng.choice(COLORS)} {pet} called {friend}."]
    for _ in range(rng.randint(6, 14)):
        kind = rng.randrange(8)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            item = rng.choice(ITEMS)
            out.append(f"{hero} had {a} {item}. {He} found {b} more, so now {he} had {a + b} {item}.")
        elif kind == 1:
            a = rng.randint(2, 30)
            b = rng.randint(1, a - 1)
            item = rng.choice(ITEMS)
            out.append(f"{hero} had {a} {item} and gave {b} to {friend}. Now {hero} had {a - b} {item} left.")
        elif kind == 2:
            start = rng.randint(1, 90)
            out.append(f"{hero} counted the {rng.choice(ITEMS)}: "
                       + ", ".join(str(n) for n in range(start, start + rng.randint(3, 8))) + ".")
        elif kind == 3:
            out.append(f"On {DAYS[day]}, {hero} and the {pet} went to the {rng.choice(SPOTS)}. "
                       f"The next day was {DAYS[(day + 1) % 7]}.")
            day = (day + 1) % 7
        elif kind == 4:
            out.append(f"In {town}, the river is always {river}, and everyone loves {food}.")
        elif kind == 5:
            thing = rng.choice(THINGS)
            out.append(f'"Where is my {thing}?" asked {hero}. "Your {thing} is under the '
                       f'{rng.choice(FURNITURE)}," said {friend}.')
        elif kind == 6:
            n = rng.randint(1, 9)
            out.append(f"{He} saw {NUMBER_WORDS[n]} {rng.choice(ANIMALS)}s, and then {NUMBER_WORDS[n + 1]}.")
        else:
            out.append(f"{hero} ate some {food} with {his} {pet}. It was {rng.choice(ADJS)} and good.")
    out.append(f"At the end of the day, {hero} went home to {town} and slept. The end.")
    return " ".join(out)


def synthetic_worksheet(rng):
    lines = [f"Worksheet {rng.randint(1, 99)}."]
    for _ in range(rng.randint(5, 15)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        lines.append(f"Q: {a} + {b} = ? A: {a + b}" if rng.random() < 0.6 else
                     f"Q: {max(a, b)} - {min(a, b)} = ? A: {max(a, b) - min(a, b)}")
    return "\n".join(lines)


def synthetic_stream(seed):
    """Documents without end from one seed: a split's are the first SYNTHETIC_DOCS of its seed's; another seed
    gives more text of the same kind (the evaluator's held-out text: prepare.synthetic_heldout_rows)."""
    rng = random.Random(seed)
    while True:
        yield synthetic_worksheet(rng) if rng.random() < 0.15 else "\n\n".join(
            synthetic_story(rng) for _ in range(rng.randint(1, 3)))


def synthetic_documents(split):
    return list(itertools.islice(synthetic_stream(SYNTHETIC_SEEDS[split]), SYNTHETIC_DOCS[split]))

# ---------------------------------------------------------------------------
# The dataset: one train shard and one val shard, from separate seeds


def make_synthetic(folder):
    """Generates the synthetic dataset into `folder`, unless the same recipe is already there; returns its
    manifest."""
    manifest = load_manifest(folder)
    recipe = {"docs": SYNTHETIC_DOCS, "seeds": SYNTHETIC_SEEDS, "format": FORMAT_VERSION}
    if manifest and manifest.get("recipe") == recipe:
        print(f"synthetic: already generated in {folder}")
        return manifest
    shards = [(shard_name(0), synthetic_documents("train")), (shard_name(1), synthetic_documents("val"))]
    print(f"synthetic: generated {SYNTHETIC_DOCS['train']} train + {SYNTHETIC_DOCS['val']} val documents, "
          f"{sum(len(d) for _, docs in shards for d in docs) / 1e6:.1f}M characters")
    manifest = {"dataset": "synthetic", "source": "generated by prepare.py", "recipe": recipe,
                "train": [shard_name(0)], "val": [shard_name(1)],
                "split": f"separate generator seeds: train {SYNTHETIC_SEEDS['train']}, val {SYNTHETIC_SEEDS['val']}"}
    return write_dataset(folder, shards, manifest)

