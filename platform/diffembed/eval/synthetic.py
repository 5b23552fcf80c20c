"""LongEmbed-style synthetic long-document tasks, generated offline and deterministically from a seed.

- passkey: every document is filler ("The grass is green. The sky is blue. ...", varied) with one sentence
  "<Name>'s pass key is NNNNN. Remember it. NNNNN is the pass key of <Name>." at a random depth; a query
  asks "What is the pass key for <Name>?". Names and keys are unique within a length.
- needle: the same kind of haystack with one distinctive fact about a named town ("The best thing to do in
  Ashford is to ..."); the query asks the matching question ("What is the best thing to do in Ashford?").

Each query has exactly one relevant document (grade 1); documents without a query are distractors. Every
document is exactly the requested length in tokens of the given tokenizer (no special tokens), so lengths
above an embedder's max_length show what its truncation or chunking does to the far end of a document.
Same seed, same tokenizer: the same task. Scored by nDCG@1, as LongEmbed does.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable

from diffembed.config import ConfigError
from diffembed.eval.beir import RetrievalData

# The filler shares no word with names, towns, keys or the questions, and has no digits.
_NOUNS = ("grass sky sun sea cloud leaf road hill rain wind snow tree flower river door window table chair cup "
          "lamp bird cat dog apple bread song book boat shell wave path roof wall fence bell coat hat").split()
_COLOURS = "green blue yellow red white grey brown pale dark orange purple pink".split()
_ADJECTIVES = "quiet warm cold clear soft calm wet dry small tall round old new wide long plain".split()
_VERBS = "moves rests waits turns shines falls grows sleeps drifts sings hums sways".split()
_ADVERBS = ("slowly", "gently", "softly", "again", "today", "all day", "at dawn", "at night", "as before")
_FIXED = ("Here we go.", "There and back again.", "Nothing changes.", "It goes on and on.", "And so it goes.")
_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"The {r.choice(_NOUNS)} is {r.choice(_COLOURS)}.",
    lambda r: f"The {r.choice(_NOUNS)} is {r.choice(_ADJECTIVES)}.",
    lambda r: f"The {r.choice(_NOUNS)} {r.choice(_VERBS)} {r.choice(_ADVERBS)}.",
    lambda r: f"A {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} {r.choice(_VERBS)} by the {r.choice(_NOUNS)}.",
    lambda r: r.choice(_FIXED),
)

_FIRST = ("Alice Bruno Chiara Dmitri Elena Farid Greta Hiro Ingrid Jonas Kavya Liam Mateo Nadia Oskar Priya "
          "Quentin Rosa Sven Tamsin Umar Vera Wendell Ximena Yusuf Zora Amara Bastian Cosima Dario Esme Felix "
          "Gideon Hana Idris Juno").split()
_LAST = ("Abernathy Bergstrom Castellano Delacroix Eriksen Fitzgerald Gallagher Hoffmann Ivanova Jablonski "
         "Kowalczyk Lindqvist Moreau Nakamura Okonkwo Petrakis Quintero Rasmussen Szabo Tanaka Underwood "
         "Valdivia Whitaker Yamamoto Zielinski Albrecht Brennan Carvalho Dubois Engstrom").split()
_TOWN_START = ("Ash Brook Cedar Elm Fair Glen Hazel Iron Kings Lark Maple North Oak Pine Raven Stone West Wolf "
               "Amber Copper Fox Holly Ivy Marsh Moss Rose Thorn Willow Heather Bramble").split()
_TOWN_END = "ford haven stead wick moor bury dale port ton mere bridge gate combe ley worth".split()
_ACTIVITIES = (
    "eat a sandwich and sit in the harbour park on a sunny day", "climb the lighthouse before breakfast",
    "rent a bicycle and follow the canal to the old mill", "watch the puppet theatre in the market square",
    "swim in the lake under the stone viaduct", "buy smoked cheese from the Saturday farmers market",
    "visit the clock museum and hear the chimes at noon", "take the cable car up to the chapel",
    "kayak through the reed marshes at sunrise", "listen to the brass band in the bandstand on Sundays",
)
_INGREDIENTS = ("smoked paprika", "a spoon of honey", "roasted fennel seeds", "sour cherries", "fresh tarragon",
                "black garlic", "toasted walnuts", "a splash of cider vinegar", "crushed juniper berries", "saffron")
_BUILDINGS = ("granary with a copper roof", "customs house built of red brick", "windmill with six sails",
              "toll bridge keeper's cottage", "bell foundry by the quay", "round tower of the old abbey",
              "timber-framed coaching inn", "lime kiln on the cliff path", "guildhall with a painted ceiling",
              "salt warehouse near the docks")
_NEEDLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("The best thing to do in {town} is to {x}.", "What is the best thing to do in {town}?", _ACTIVITIES),
    ("The secret ingredient of the fish soup served in {town} is {x}.",
     "What is the secret ingredient of the fish soup served in {town}?", _INGREDIENTS),
    ("The oldest building in {town} is the {x}.", "What is the oldest building in {town}?", _BUILDINGS),
)

SLACK_TOKENS = 16  # extra filler generated past the target, so the cut always lands in filler


def token_length(tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens (the unit of every synthetic document's length)."""
    from diffembed.models.loading import quiet_transformers

    with quiet_transformers():  # no "longer than the maximum" warning: we only count
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Haystack:
    """Builds filler of a given token length around one inserted sentence, for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cost: dict[str, int] = {}

    def cost(self, sentence: str) -> int:
        """Tokens a sentence adds after a space (cached: the filler reuses a few thousand sentences)."""
        if sentence not in self._cost:
            self._cost[sentence] = max(1, token_length(self.tokenizer, " " + sentence))
        return self._cost[sentence]

    def _filler(self, rng: random.Random, tokens: int) -> list[str]:
        out, total = [], 0
        while total < tokens:
            sentence = rng.choice(_TEMPLATES)(rng)
            out.append(sentence)
            total += self.cost(sentence)
        return out

    def _encode(self, text: str) -> list[tuple[int, int]]:
        from diffembed.models.loading import quiet_transformers

        with quiet_transformers():
            return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def document(self, rng: random.Random, needle: str, length: int) -> tuple[str, int]:
        """(text, depth): filler with `needle` starting near token `depth`, cut to exactly `length` tokens."""
        needle_tokens = token_length(self.tokenizer, needle)
        room = length - needle_tokens - 2
        if room < 0:
            raise ConfigError(
                f"a {length}-token document cannot hold its {needle_tokens}-token inserted sentence; "
                f"use longer lengths"
            )
        depth = rng.randint(0, room)
        before = self._filler(rng, depth) if depth else []
        while before and sum(self.cost(s) for s in before) > depth:  # start at a sentence boundary <= depth
            before.pop()
        after = self._filler(rng, length - depth + SLACK_TOKENS)
        text = " ".join([*before, needle, *after])
        offsets = self._encode(text)
        while len(offsets) < length + 2:  # estimates were short (tokenizers merge across spaces): add more
            text += " " + " ".join(self._filler(rng, length - len(offsets) + SLACK_TOKENS))
            offsets = self._encode(text)
        return self._cut(text, offsets, length), sum(self.cost(s) for s in before)

    def _cut(self, text: str, offsets: list[tuple[int, int]], length: int) -> str:
        """The prefix of `text` that tokenizes to exactly `length` tokens (a prefix can re-tokenize differently
        at its end, so the cut moves until the count matches; the closest is kept if none does)."""
        best, best_gap, cut, tried = text, None, length, set()
        for _ in range(12):
            if cut in tried or not 0 < cut <= len(offsets):
                break
            tried.add(cut)
            candidate = text[: offsets[cut - 1][1]]
            n = token_length(self.tokenizer, candidate)
            if n == length:
                return candidate
            if best_gap is None or abs(n - length) < best_gap:
                best, best_gap = candidate, abs(n - length)
            cut += length - n
            if cut in tried:  # oscillating between two cuts: try the neighbours
                cut = next((c for c in (cut + 1, cut - 1, cut + 2, cut - 2) if c not in tried), cut)
        return best


def _rng(kind: str, seed: int, length: int) -> random.Random:
    return random.Random(f"diffembed-{kind}-{seed}-{length}")  # str seeds hash the same on every run


def _check_sizes(kind: str, n_queries: int, n_documents: int, capacity: int) -> None:
    if n_queries > n_documents:
        raise ConfigError(f"{kind}: {n_queries} queries need at least as many documents, got {n_documents}")
    if n_documents > capacity:
        raise ConfigError(f"{kind}: at most {capacity} documents per length (unique names), got {n_documents}")
    if n_queries < 1:
        raise ConfigError(f"{kind}: needs at least one query")


def _assemble(name: str, kind: str, length: int, seed: int, tokenizer, needles: list[str], questions: list[str],
              answers: list[str], n_queries: int, rng: random.Random) -> RetrievalData:
    haystack = _Haystack(tokenizer)
    corpus, depths = {}, {}
    doc_ids = [f"{kind}-{length}-d{j:04d}" for j in range(len(needles))]
    for doc_id, needle in zip(doc_ids, needles):
        corpus[doc_id], depths[doc_id] = haystack.document(rng, needle, length)
    asked = rng.sample(range(len(needles)), n_queries)  # which documents get a query
    queries, qrels, meta_answers, meta_needles = {}, {}, {}, {}
    for i, j in enumerate(asked):
        qid = f"{kind}-{length}-q{i:04d}"
        queries[qid] = questions[j]
        qrels[qid] = {doc_ids[j]: 1}
        meta_answers[qid] = answers[j]
        meta_needles[qid] = needles[j]
    return RetrievalData(
        name=name, corpus=corpus, queries=queries, qrels=qrels,
        meta={"kind": kind, "length": length, "seed": seed, "answers": meta_answers, "needles": meta_needles,
              "depths": depths},
    )


def passkey_task(tokenizer, length: int, n_queries: int = 50, n_documents: int = 100, seed: int = 0,
                 name: str | None = None) -> RetrievalData:
    """One length of the passkey task: `n_documents` documents of `length` tokens, `n_queries` of them asked for."""
    people = list(itertools.product(_FIRST, _LAST))
    _check_sizes("passkey", n_queries, n_documents, len(people))
    rng = _rng("passkey", seed, length)
    chosen = [f"{first} {last}" for first, last in rng.sample(people, n_documents)]
    keys = [str(k) for k in rng.sample(range(10000, 100000), n_documents)]
    needles = [f"{p}'s pass key is {k}. Remember it. {k} is the pass key of {p}." for p, k in zip(chosen, keys)]
    questions = [f"What is the pass key for {p}?" for p in chosen]
    return _assemble(name or f"passkey@{length}", "passkey", length, seed, tokenizer, needles, questions, keys,
                     n_queries, rng)


def needle_task(tokenizer, length: int, n_queries: int = 50, n_documents: int = 100, seed: int = 0,
                name: str | None = None) -> RetrievalData:
    """One length of the needle task: a distinctive fact about a named town hidden in each document."""
    towns = [a + b for a, b in itertools.product(_TOWN_START, _TOWN_END)]
    _check_sizes("needle", n_queries, n_documents, len(towns))
    rng = _rng("needle", seed, length)
    chosen = rng.sample(towns, n_documents)
    needles, questions, answers = [], [], []
    for town in chosen:
        fact, question, values = rng.choice(_NEEDLES)
        x = rng.choice(values)
        needles.append(fact.format(town=town, x=x))
        questions.append(question.format(town=town))
        answers.append(x)
    return _assemble(name or f"needle@{length}", "needle", length, seed, tokenizer, needles, questions, answers,
                     n_queries, rng)


GENERATORS: dict[str, Callable[..., RetrievalData]] = {"passkey": passkey_task, "needle": needle_task}


def synthetic_tasks(task: Any, tokenizer) -> list[RetrievalData]:
    """A `TaskConfig` of kind passkey/needle -> one `RetrievalData` per length, named '<task>@<length>'."""
    generate = GENERATORS[task.kind]
    return [
        generate(tokenizer, length, task.queries_per_length, task.documents_per_length, task.seed,
                 name=f"{task.name}@{length}")
        for length in task.lengths
    ]
