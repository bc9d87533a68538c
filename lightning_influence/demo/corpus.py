"""A small, seeded synthetic corpus in which influence is visible.

The corpus describes invented characters (names, home towns, occupations, pets,
character traits and, for some, a unique title such as "the lighthouse keeper of
Varnholm"). Every attribute is a *planted fact* with an id like
``"oswin_pelleck.occupation"``; each fact is stated in several training sequences
(3-8 by default) with different wording, so that a tiny GPT-2 can learn it and so that
an influence method has a known set of "right answers" to retrieve.

Three kinds of training sequence:

- ``"fact"``: third-person statements ("Oswin Pelleck works as a clockmaker."),
  sometimes two facts in one sequence.
- ``"dialogue"``: short persona-grounded exchanges ("Traveler: What do you do for a
  living? Oswin Pelleck: I am a clockmaker.").
- ``"filler"``: distractors that mention the same names, towns, occupations and pets in
  unrelated relations ("Oswin Pelleck bought a lamp from a potter."), so that lexical
  overlap (TF-IDF) alone does not pick out the supporting sequences.

Title facts come in two orders: description first ("The lighthouse keeper of Varnholm
is Oswin Pelleck.") or name first ("Oswin Pelleck is the lighthouse keeper of
Varnholm."); each such fact is trained in one order only. :func:`make_queries` asks one
query in the order opposite to training (the "reversal curse" setting, where influence
is expected to vanish) and the others as paraphrases in the trained direction.

Each query prompt is also a training form for *other* characters (so a small model knows
the question format), but never for the fact it asks about.

Everything is a pure function of the seed: same seed, same corpus, same queries.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

__all__ = [
    "Corpus",
    "FACT_TYPES",
    "generate_corpus",
    "make_queries",
    "supporting_indices",
]

DEFAULT_NUM_SEQUENCES = 2400
DEFAULT_SEED = 0

FACT_TYPES = ("occupation", "hometown", "pet", "trait", "title")

# --- vocabularies -----------------------------------------------------------------------
# Occupations and pets all start with a consonant so that "a" is always the right
# article (queries end in "... a" and must not leak the answer through "an").
# Title roles are disjoint from occupations, so "clockmaker" never means two things.
_FIRST_HEADS = [
    "Os", "Bri", "Ta", "Mel", "Ker", "Ul", "Fen", "Dra", "Sil", "Ro", "Ny", "Gal",
    "Hes", "Ja", "Lio", "Mor", "Quen", "Ry", "Sa", "Tor", "Vey", "Wil", "Zan", "Bel",
    "Cor", "Ede", "Ith", "Ma", "Per", "Thes",
]
_FIRST_TAILS = [
    "win", "ra", "mund", "ela", "ric", "dis", "tha", "ven", "wyn", "lo", "mira", "dric",
    "nna", "bert", "sin", "dora",
]
_LAST_HEADS = [
    "Pell", "Ash", "Bram", "Corr", "Dun", "Fal", "Grim", "Hollo", "Kest", "Lark", "Marr",
    "Nettle", "Orm", "Quill", "Rook", "Sten", "Thorn", "Vell", "Wick", "Yarr", "Brisk",
    "Cald", "Fairn", "Gosl",
]
_LAST_TAILS = [
    "eck", "ow", "ley", "by", "mere", "wick", "ford", "hart", "some", "well", "ing",
    "den", "ett", "ock",
]
_PLACE_HEADS = [
    "Varn", "Grims", "Dun", "Kell", "Ost", "Bry", "Hal", "Mar", "Thal", "Eld", "Wend",
    "Ros", "Carr", "Fenn", "Lund", "Brack", "Sorr", "Tam", "Yew", "Quor",
]
_PLACE_TAILS = [
    "holm", "worth", "mere", "by", "wick", "stead", "ford", "gate", "haven", "moor",
    "dale", "port",
]
OCCUPATIONS = [
    "clockmaker", "beekeeper", "glassblower", "potter", "locksmith", "tailor", "baker",
    "weaver", "candlemaker", "cooper", "saddler", "fisherman", "bookbinder",
    "shoemaker", "blacksmith", "carpenter", "stonemason", "miller", "barber", "tanner",
    "ropemaker", "butcher", "shepherd", "cheesemaker", "painter", "sculptor", "jeweler",
    "furrier", "thatcher", "wheelwright",
]
PETS = [
    "heron", "tortoise", "ferret", "goose", "parrot", "hedgehog", "lizard", "badger",
    "raven", "goat", "donkey", "rabbit", "beagle", "magpie", "toad", "canary", "pony",
    "salamander", "crow", "mole",
]
TRAITS = [
    "stubborn", "cheerful", "forgetful", "generous", "curious", "patient", "grumpy",
    "shy", "boastful", "punctual", "clumsy", "thrifty", "witty", "gentle", "restless",
    "tidy", "nervous", "brave", "lazy", "polite",
]
TITLE_ROLES = [
    "lighthouse keeper", "harbor master", "bell ringer", "chief archivist",
    "royal cartographer", "head gardener", "ferry captain", "master brewer",
    "town crier", "night watchman", "choir master", "bridge warden",
]
_PARTNERS = ["Traveler", "Visitor", "Stranger", "Neighbor", "Child", "Guest"]
_ITEMS = ["a lamp", "a basket", "a kettle", "some rope", "a chair", "a coat", "a barrel"]
_WEATHER = ["rain", "fog", "snow", "wind", "a storm", "hail"]

# --- training surface forms -------------------------------------------------------------
# Query prompts; the completion follows after one space. Each is ALSO a training form
# (added to _SINGLE below), so a tiny model learns the question format from other
# characters; make_queries only asks about facts whose own statements never use it, so a
# query is always a paraphrase of what was trained for its fact.
_QUERY_PROMPTS = {
    "occupation": "{name} has a job as a",
    "hometown": "The home town of {name} is",
    "pet": "The animal that {name} keeps as a pet is a",
    "trait": "The word that best describes {name} is",
    # Same prompt for the forward and the reversed title query, so the two differ only
    # in the order the fact was trained in. Description first, so as a training form
    # it only serves description-first titles.
    "title": "Who holds the post of {role} of {place}? It is",
}
_SINGLE = {
    "occupation": [
        _QUERY_PROMPTS["occupation"] + " {occupation}.",
        "{name} works as a {occupation}.",
        "{name} is a {occupation} by trade.",
        "By profession, {name} is a {occupation}.",
        "{name} earns a living as a {occupation}.",
        "Everyone in town knows {name} as a skilled {occupation}.",
        "For many years {name} has worked as a {occupation}.",
    ],
    "hometown": [
        _QUERY_PROMPTS["hometown"] + " {hometown}.",
        "{name} grew up in {hometown}.",
        "{name} was born in {hometown}.",
        "{name} comes from the town of {hometown}.",
        "{name} is a native of {hometown}.",
        "As a child, {name} lived in {hometown}.",
        "{name} still visits {hometown}, the town where {name} was born.",
    ],
    "pet": [
        _QUERY_PROMPTS["pet"] + " {pet}.",
        "{name} has a pet {pet}.",
        "{name} lives with a {pet}.",
        "At home, {name} keeps a {pet}.",
        "{name} feeds a pet {pet} every morning.",
        "{name} takes good care of a pet {pet}.",
        "A {pet} lives in the house of {name} as a pet.",
    ],
    "trait": [
        _QUERY_PROMPTS["trait"] + " {trait}.",
        "{name} is known for being {trait}.",
        "Friends say that {name} is very {trait}.",
        "{name} has always been {trait}.",
        "Everyone agrees that {name} is {trait}.",
        "{name} is, above all, a {trait} person.",
        "People often remark how {trait} {name} is.",
    ],
    # Title facts are trained in exactly one order; see _TITLE_ORDERS.
    "title:name_first": [
        "{name} is the {role} of {place}.",
        "{name} serves as the {role} of {place}.",
        "{name} was appointed the {role} of {place}.",
        "{name} has long been the {role} of {place}.",
        "{name} works proudly as the {role} of {place}.",
        "{name} is the current {role} of {place}.",
    ],
    "title:description_first": [
        _QUERY_PROMPTS["title"] + " {name}.",
        "The {role} of {place} is {name}.",
        "The current {role} of {place} is {name}.",
        "The {role} of {place}, as everyone knows, is {name}.",
        "The job of {role} of {place} belongs to {name}.",
        "The person who is the {role} of {place} is {name}.",
        "The new {role} of {place} is {name}.",
    ],
}
_PAIR = {
    ("occupation", "hometown"): [
        "{name} is a {occupation} who grew up in {hometown}.",
        "Born in {hometown}, {name} now works as a {occupation}.",
    ],
    ("occupation", "pet"): [
        "{name} works as a {occupation} and has a pet {pet}.",
        "After a day as a {occupation}, {name} goes home to a pet {pet}.",
    ],
    ("occupation", "trait"): [
        "{name} is a {trait} {occupation}.",
        "As a {occupation}, {name} is known for being {trait}.",
    ],
    ("hometown", "pet"): [
        "{name} grew up in {hometown} with a pet {pet}.",
        "{name}, a native of {hometown}, keeps a {pet} as a pet.",
    ],
    ("hometown", "trait"): [
        "{name} was born in {hometown} and has always been {trait}.",
        "{name}, who was born in {hometown}, is very {trait}.",
    ],
    ("pet", "trait"): [
        "{name} has a pet {pet} and is known for being {trait}.",
        "{name}, who keeps a {pet}, is a {trait} person.",
    ],
}
# First-person clauses for persona dialogues: (opener asked by the partner, answer).
_DIALOGUE = {
    "occupation": [
        ("What do you do for a living?", "I work as a {occupation}."),
        ("What is your trade?", "I am a {occupation}."),
        ("How do you earn your bread?", "I am a {occupation}, like my mother."),
    ],
    "hometown": [
        ("Where are you from?", "I grew up in {hometown}."),
        ("Where were you born?", "I was born in {hometown}."),
        ("Is this your home town?", "No, I come from {hometown}."),
    ],
    "pet": [
        ("Do you have any pets?", "Yes, I have a pet {pet}."),
        ("Who keeps you company at home?", "My pet {pet} does."),
        ("What animal is that?", "That is my pet {pet}."),
    ],
    "trait": [
        ("How would your friends describe you?", "They say I am very {trait}."),
        ("What are you like?", "I have always been {trait}."),
        ("Are you always like this?", "Yes, I am a {trait} person."),
    ],
    "title:name_first": [
        ("What is your job here?", "I am the {role} of {place}."),
        ("Do you work in {place}?", "Yes, I serve as the {role} of {place}."),
    ],
    # Third person on purpose: the role-holder is named after the description.
    "title:description_first": [
        ("Who is the {role} of {place}?", "The {role} of {place} is {name}."),
        ("Do you know the {role} of {place}?", "Of course, the {role} of {place} is {name}."),
    ],
}
_DIALOGUE_GREETINGS = ["I am {name}.", "My name is {name}.", "Hello, I am {name}."]

_FILLER = [
    "{name} walked to the market when {weather} started.",
    "A letter addressed to {name} arrived two days late.",
    "{name} and {other} argued about {weather} for an hour.",
    "Nobody remembers whether {name} liked the autumn fair.",
    "{name} bought {item} from a {occupation_other}.",
    "{name} once chased a {pet_other} out of the garden.",
    "{name} felt {trait_other} after the long journey.",
    "{name} read a book about {town_other} last winter.",
    "The road from {town_other} to {town} was closed because of {weather}.",
    "A {occupation_other} from far away visited {town} in spring.",
    "The {role} of {place} rang the bell twice at noon.",
    "Visitor: Have you seen {name} today? Neighbor: Not since breakfast.",
    "{other} wrote a short song about {name} and a {pet_other}.",
    "{name} waited for {other} at the bridge until {weather} came.",
]


@dataclass
class Corpus:
    """A generated corpus.

    Attributes:
        records: training sequences, ``records[i]["index"] == i``; each is
            ``{"index", "text", "kind", "fact_ids"}``.
        facts: ``fact_id -> {"fact_id", "type", "name", "value", "order", ...}``; for
            title facts ``value`` is the description ("the lighthouse keeper of
            Varnholm") and ``order`` is ``"name_first"`` or ``"description_first"``
            (``None`` for the other types).
        characters: one dict per character with its attributes.
        seed: the seed it was generated from.
    """

    records: list[dict[str, Any]]
    facts: dict[str, dict[str, Any]]
    characters: list[dict[str, Any]]
    seed: int
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _unique_names(rng: random.Random, n: int, make) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(n * 200):
        if len(out) == n:
            break
        cand = make()
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    if len(out) < n:
        raise ValueError(f"could not invent {n} distinct names; lower the corpus size")
    return out


def _make_character(rng: random.Random, name: str, towns: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "slug": _slug(name),
        "occupation": rng.choice(OCCUPATIONS),
        "hometown": rng.choice(towns),
        "pet": rng.choice(PETS),
        "trait": rng.choice(TRAITS),
    }


def _variant(pool: list, counter: dict, key: str, rng: random.Random):
    """Cycle through a per-key shuffled pool, so repeated statements of one fact differ."""
    state = counter.get(key)
    if state is None or state[1] >= len(state[0]):
        order = list(pool)
        rng.shuffle(order)
        state = [order, 0]
        counter[key] = state
    item = state[0][state[1]]
    state[1] += 1
    return item


def _render_statement(
    rng: random.Random, ch: dict[str, Any], key: str, partner: str | None,
    as_dialogue: bool, used: dict,
) -> str:
    """One template (still to be filled) stating fact ``key`` and, optionally, ``partner``."""
    if not as_dialogue:
        if partner:
            pair = tuple(sorted([key, partner], key=FACT_TYPES.index))
            return _variant(_PAIR[pair], used, "p:" + "+".join(pair), rng)
        return _variant(_SINGLE[key], used, "s:" + key, rng)
    who = rng.choice(_PARTNERS)
    opener, answer = _variant(_DIALOGUE[key], used, "d:" + key, rng)
    if key == "title:description_first":
        # Asked and answered by two others, so the name comes after the role.
        other = rng.choice([p for p in _PARTNERS if p != who])
        return f"{who}: {opener} {other}: {answer}"
    greet = _variant(_DIALOGUE_GREETINGS, used, "greet", rng)
    text = f"{who}: {opener} {ch['name']}: {greet} {answer}"
    if partner:
        _, extra = _variant(_DIALOGUE[partner], used, "d:" + partner, rng)
        text += " " + extra
    return text


def _render_fact_sequences(
    rng: random.Random,
    ch: dict[str, Any],
    support: dict[str, int],
    dialogue_prob: float,
    pair_prob: float,
) -> list[dict[str, Any]]:
    """Turn per-fact statement counts of one character into training sequences."""
    units = [ftype for ftype, n in support.items() for _ in range(n)]
    rng.shuffle(units)
    title_key = f"title:{ch['title_order']}" if "title" in support else None
    used: dict = {}
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while units:
        ftype = units.pop()
        partner = None
        if ftype != "title" and rng.random() < pair_prob:
            # Pair with a different non-title fact still waiting to be stated; titles
            # stay alone so that their word order is never mixed with another clause.
            for j in range(len(units) - 1, -1, -1):
                if units[j] not in ("title", ftype):
                    partner = units.pop(j)
                    break
        key = title_key if ftype == "title" else ftype
        types = [ftype] + ([partner] if partner else [])
        # Re-draw (as a dialogue, the form with most variants) until the wording is new,
        # so that repeated statements of a fact never share a text.
        for attempt in range(100):
            as_dialogue = attempt > 0 or rng.random() < dialogue_prob
            text = _render_statement(rng, ch, key, partner, as_dialogue, used).format(**ch)
            if text not in seen:
                break
        seen.add(text)
        out.append(
            {
                "text": text,
                "kind": "dialogue" if as_dialogue else "fact",
                "fact_ids": sorted(f"{ch['slug']}.{t}" for t in types),
            }
        )
    return out


def _render_filler(rng: random.Random, characters: list[dict], towns: list[str]) -> str:
    ch = rng.choice(characters)
    other = rng.choice([c for c in characters if c is not ch] or [ch])
    titled = [c for c in characters if "role" in c]
    t = rng.choice(titled) if titled else None
    values = {
        "name": ch["name"],
        "other": other["name"],
        "weather": rng.choice(_WEATHER),
        "item": rng.choice(_ITEMS),
        # Distractor attributes are never those of a character named in the filler, so
        # a filler never (even loosely) states a planted fact.
        "occupation_other": rng.choice(
            [o for o in OCCUPATIONS if o not in (ch["occupation"], other["occupation"])]),
        "pet_other": rng.choice([p for p in PETS if p not in (ch["pet"], other["pet"])]),
        "trait_other": rng.choice([x for x in TRAITS if x not in (ch["trait"], other["trait"])]),
        "town": ch["hometown"],
        "town_other": rng.choice([x for x in towns if x != ch["hometown"]]),
        # The description alone, without its holder: lexical overlap with title queries.
        "role": t["role"] if t else "bell ringer",
        "place": t["place"] if t else ch["hometown"],
    }
    return rng.choice(_FILLER).format(**values)


def generate_corpus(
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seed: int = DEFAULT_SEED,
    *,
    filler_fraction: float = 0.25,
    min_support: int = 3,
    max_support: int = 8,
    title_fraction: float = 0.4,
    dialogue_prob: float = 0.35,
    pair_prob: float = 0.3,
) -> Corpus:
    """Generate the synthetic corpus.

    Args:
        num_sequences: exact number of training sequences returned.
        seed: everything is a deterministic function of this seed.
        filler_fraction: share of the sequences (at least) that are distractor filler;
            the rest state planted facts.
        min_support, max_support: each planted fact is stated in a number of
            sequences drawn uniformly from this range.
        title_fraction: share of characters who also hold a unique title; titles
            alternate between name-first and description-first training order.
        dialogue_prob: chance that a fact statement is rendered as a dialogue.
        pair_prob: chance that a statement also carries a second fact.

    Returns:
        A :class:`Corpus`; ``corpus.records[i]`` is
        ``{"index": i, "text": str, "kind": "fact"|"dialogue"|"filler",
        "fact_ids": list[str]}``.
    """
    if num_sequences < 100:
        raise ValueError("num_sequences must be at least 100 (room for a few characters)")
    if not 1 <= min_support <= max_support:
        raise ValueError("need 1 <= min_support <= max_support")
    rng = random.Random(seed)

    # Invent more names than needed; characters are added until the fact budget is used.
    avg_per_char = (len(FACT_TYPES) - 1 + title_fraction) * (min_support + max_support) / 2
    avg_per_char /= 1 + pair_prob * 0.8  # some sequences state two facts
    max_chars = int(num_sequences * (1 - filler_fraction) / avg_per_char * 2) + 8
    names = _unique_names(
        rng, max_chars,
        lambda: f"{rng.choice(_FIRST_HEADS)}{rng.choice(_FIRST_TAILS)} "
        f"{rng.choice(_LAST_HEADS)}{rng.choice(_LAST_TAILS)}",
    )
    towns = _unique_names(rng, 40, lambda: rng.choice(_PLACE_HEADS) + rng.choice(_PLACE_TAILS))
    title_places = _unique_names(
        rng, 60, lambda: rng.choice(_PLACE_HEADS) + rng.choice(_PLACE_TAILS)
    )
    titles = [(r, p) for p in title_places for r in TITLE_ROLES]
    rng.shuffle(titles)  # unique (role, place) pairs: a description names one person

    budget = int(num_sequences * (1 - filler_fraction))
    characters: list[dict[str, Any]] = []
    facts: dict[str, dict[str, Any]] = {}
    fact_records: list[dict[str, Any]] = []
    n_titles = 0
    for name in names:
        ch = _make_character(rng, name, towns)
        # The first two characters always hold titles, one per training order, so even a
        # small corpus supports a forward and a reversed title query.
        if n_titles < 2 or rng.random() < title_fraction:
            role, place = titles.pop()
            ch.update(role=role, place=place,
                      title_order=("name_first", "description_first")[n_titles % 2])
        types = [t for t in FACT_TYPES if t != "title" or "role" in ch]
        support = {t: rng.randint(min_support, max_support) for t in types}
        seqs = _render_fact_sequences(rng, ch, support, dialogue_prob, pair_prob)
        if len(fact_records) + len(seqs) > budget:
            break
        n_titles += "role" in ch
        characters.append(ch)
        fact_records.extend(seqs)
        for t in types:
            fid = f"{ch['slug']}.{t}"
            facts[fid] = {
                "fact_id": fid,
                "type": t,
                "name": ch["name"],
                "value": f"the {ch['role']} of {ch['place']}" if t == "title" else ch[t],
                "order": ch["title_order"] if t == "title" else None,
            }
            if t == "title":
                facts[fid].update(role=ch["role"], place=ch["place"])
    if len(characters) < 2:
        raise ValueError("num_sequences too small to hold two characters")

    filler = [
        {"text": _render_filler(rng, characters, towns), "kind": "filler", "fact_ids": []}
        for _ in range(num_sequences - len(fact_records))
    ]
    records = fact_records + filler
    rng.shuffle(records)
    records = [{"index": i, **r} for i, r in enumerate(records)]
    config = dict(
        num_sequences=num_sequences, filler_fraction=filler_fraction,
        min_support=min_support, max_support=max_support, title_fraction=title_fraction,
        dialogue_prob=dialogue_prob, pair_prob=pair_prob,
    )
    return Corpus(records=records, facts=facts, characters=characters, seed=seed,
                  config=config)


def supporting_indices(corpus: Corpus | Sequence[dict[str, Any]], fact_id: str) -> list[int]:
    """Indices (``record["index"]``) of the training sequences that state ``fact_id``.

    Accepts a :class:`Corpus` or a plain list of records.
    """
    return [r["index"] for r in corpus if fact_id in r["fact_ids"]]


def make_queries(
    corpus_or_seed: Corpus | int,
    num_queries: int = 6,
    *,
    seed: int | None = None,
    **corpus_kwargs: Any,
) -> list[dict[str, Any]]:
    """Queries about planted facts, each a paraphrase of its training statements.

    Args:
        corpus_or_seed: a :class:`Corpus`, or a seed for :func:`generate_corpus`
            (called with ``corpus_kwargs``).
        num_queries: how many queries (default 6). Exactly one of them (if
            ``num_queries >= 1``) has ``reversed=True``: it asks "description -> name"
            for a title fact that training states only as "name -> description".
            The others cycle through occupation, home town, pet, trait and a
            description-first title fact asked in its trained direction.
        seed: picks which facts are asked; defaults to the corpus seed.

    Returns:
        ``[{"query_id", "prompt", "completion", "fact_id", "reversed"}]``; the
        completion is one to three words (occupation, town, pet, trait or a name).
        Only facts whose own training statements never use the query's wording are
        asked (the wording is trained on other characters); among those, facts with
        the most supporting sequences are preferred, so a small model has the best
        chance of having learned them.
    """
    corpus = corpus_or_seed if isinstance(corpus_or_seed, Corpus) else generate_corpus(
        seed=int(corpus_or_seed), **corpus_kwargs
    )
    rng = random.Random(corpus.seed if seed is None else seed)
    support = {fid: len(supporting_indices(corpus, fid)) for fid in corpus.facts}

    def prompt(fid: str) -> str:
        info = corpus.facts[fid]
        return _QUERY_PROMPTS[info["type"]].format(
            name=info["name"], role=info.get("role"), place=info.get("place"))

    def held_out(fid: str) -> bool:  # the query form is not one of the fact's statements
        p = prompt(fid)
        return not any(p in corpus[i]["text"] for i in supporting_indices(corpus, fid))

    def ranked(pred) -> list[str]:
        fids = [f for f, info in corpus.facts.items() if pred(info) and held_out(f)]
        rng.shuffle(fids)  # random among equals, then most-supported first
        return sorted(fids, key=lambda f: -support[f])

    reversed_pool = ranked(lambda f: f["type"] == "title" and f["order"] == "name_first")
    forward_pools = {
        t: ranked(lambda f, t=t: f["type"] == t and f["order"] in (None, "description_first"))
        for t in ("occupation", "hometown", "pet", "trait", "title")
    }
    if num_queries >= 1 and not reversed_pool:
        raise ValueError("corpus has no name-first title fact to ask in reverse")

    chosen: list[tuple[str, bool]] = []
    if num_queries >= 1:
        chosen.append((reversed_pool[0], True))
    used_names = {corpus.facts[reversed_pool[0]]["name"]} if chosen else set()
    order = list(forward_pools)
    i = 0
    while len(chosen) < num_queries:
        if not any(forward_pools.values()):
            raise ValueError(f"corpus has too few facts for {num_queries} queries")
        pool = forward_pools[order[i % len(order)]]
        i += 1
        # Prefer a character not asked about yet, so queries do not share support.
        pick = next((f for f in pool if corpus.facts[f]["name"] not in used_names),
                    pool[0] if pool else None)
        if pick is None:
            continue
        pool.remove(pick)
        used_names.add(corpus.facts[pick]["name"])
        chosen.append((pick, False))
    # Forward queries first, the reversed one last: reads naturally in reports.
    chosen = chosen[1:] + chosen[:1]

    queries = []
    for n, (fid, is_rev) in enumerate(chosen):
        info = corpus.facts[fid]
        ftype = info["type"]
        completion = info["name"] if ftype == "title" else info["value"]
        queries.append(
            {
                "query_id": f"q{n}_{ftype}" + ("_reversed" if is_rev else ""),
                "prompt": prompt(fid),
                "completion": completion,
                "fact_id": fid,
                "reversed": is_rev,
            }
        )
    return queries
