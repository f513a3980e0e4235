"""The knowledge base as something to look facts up in: the diseases a question names (by name, alias, the words
people use for them, or a miswriting that sounds the same), the diseases a description of symptoms may point to (a
ranked list with a confidence, or nothing), the attribute a question asks for, the facts it needs, and which of a
disease's facts a text names. Knowledge-tuning (docs/knowledge.md) and the exam's fact-level scores use it.

Sources (`KnowledgeIndex.load`): `kb` (the curated knowledge base, with the words people use for its entries in
`kb/usage.yaml`), `cmekg` (needs the `cmekg` extra), `both`, or a JSONL/YAML file of `{name, aliases, <attribute>:
[items]}` records. Retrieval is deterministic and needs no model. How it links and ranks: docs/knowledge.md
("Retrieval"); matching of items: docs/evaluation.md ("Fact-level scores").
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from medlora.errors import DataError
from medlora.vocab import (ASKS_ALL, ASKS_DISEASE, ASKS_EXTRA, ATTRIBUTES, DEFAULT_KEYS, LABELS,  # noqa: F401
                           asked_attributes, canonical, normalise, wordings)

FUZZY_CUTOFF = 80  # rapidfuzz partial_ratio for a name or alias of 5+ characters: one character changed
MAX_ITEMS = 10  # items per retrieved fact line (CMeKG lists run to dozens)
SOUND_MIN_CHARS = 3  # a name matched by its sound (唐尿病 for 糖尿病) has 3+ characters: two-character homophones abound
# A description (no disease named) is ranked against the entries by BM25 over its terms; the best entry is offered
# as a possibility only when its score reaches MIN_DESCRIPTION_SCORE, it leads the second by LEAD times, and it
# shares MIN_SHARED_TERMS or more terms with the question. Chosen on the half of data/linking's narrative and none
# questions whose sha256 is even (9% of the possibilities shown there wrong, 97% of none questions get nothing);
# the other half, never looked at while choosing, gave 12.5% and 95% (docs/knowledge.md, "Retrieval").
MIN_DESCRIPTION_SCORE = 5.0
LEAD = 1.5
MIN_SHARED_TERMS = 2
RANKED_ATTRIBUTES = ("symptoms", "drugs", "examinations", "causes", "complications", "high_risk_groups")
POSSIBLE = "可能相关"  # how a candidate for a description is shown: something to check with a doctor
RED_FLAG = "急症信号"  # how a red flag the question shows is put to the model (kb/red_flags.yaml)
ASKS_USE = r"治什么|用于什么|有什么用|用途|适应[证症]|针对什么|治疗什么|治疗哪|治哪|用来治"  # what a drug is for


@dataclass(frozen=True)
class Match:
    """One linked entry: why it matched (`name`, `alias`, `usage` (the words people use, kb/usage.yaml), `generic`
    (a word covering several entries), `sound` (a miswriting that sounds like a name), `fuzzy` (one character
    changed), `context` (an earlier turn named it), `items` (a description's terms, ranked by BM25)), its score
    (1.0 for a name; the BM25 score for `items`), and whether it is only a possibility to check with a doctor."""

    disease: str
    why: str
    score: float = 1.0
    possible: bool = False

    def to_dict(self) -> dict:
        return {"disease": self.disease, "why": self.why, "score": round(self.score, 3), "possible": self.possible}


class KnowledgeIndex:
    """Diseases of the curated knowledge base (or any list of such dicts), by name, alias and usage."""

    def __init__(self, diseases: list[dict], usage: dict | None = None):
        self.diseases = {d["name"]: d for d in diseases}
        # normalised form -> (why, [diseases]); an entry's own name and aliases first, then usage words, which never
        # take a form from an entry; `not` words link to nothing (their diseases list is empty)
        self._names: dict[str, tuple[str, list[str]]] = {}
        for d in diseases:  # a form normalised to "" would match every text: the files' checks refuse one
            if normalise(d["name"]):
                self._names.setdefault(normalise(d["name"]), ("name", [d["name"]]))
        for d in diseases:
            for alias in d.get("aliases", []):
                if normalise(alias):
                    self._names.setdefault(normalise(alias), ("alias", [d["name"]]))
        for word, why, covered in _usage_forms(usage or {}):
            covered = [name for name in covered if name in self.diseases]
            if normalise(word) and (covered or why == "not"):
                self._names.setdefault(normalise(word), (why, covered))
        self._automaton = _automaton(self._names)
        self._fuzzy_forms = sorted((f for f, (why, names) in self._names.items()
                                    if len(f) >= 5 and names and not f.isascii() and not f[:3].isascii()),
                                   key=len, reverse=True)  # what `link(fuzzy=True)` may match
        self._vocab = {}  # attribute -> {normalised form: canonical item}, over all diseases
        for attribute in ATTRIBUTES:
            forms = {}
            for d in diseases:
                for item in self.items(d["name"], attribute):
                    for form in self.forms(item):
                        forms.setdefault(form, item)
            self._vocab[attribute] = forms

    @classmethod
    def builtin(cls, kb_dir: str | Path | None = None) -> "KnowledgeIndex":
        return _builtin(str(kb_dir) if kb_dir else None)

    def items(self, disease: str, attribute: str) -> list[str]:
        """The knowledge base's items for one attribute (or EXTRA_KEYS field) of one disease ([] when none)."""
        entry = self.diseases.get(disease) or {}
        value = entry.get(attribute)
        return [value] if isinstance(value, str) else list(value or [])

    def forms(self, item: str) -> list[str]:
        """An item's normalised wordings: itself, its synonyms, and the aliases of the disease it names."""
        forms = wordings(item)
        entry = self.diseases.get(item)
        if entry:
            forms += entry.get("aliases", [])
        return [f for f in dict.fromkeys(normalise(f) for f in forms) if f]

    # --- linking: the diseases a text names -----------------------------------------------------------------------

    def link(self, text: str, fuzzy: bool = False) -> list[str]:
        """Diseases named in `text`, in order of appearance (a generic word's entries in its order); with `fuzzy`,
        also by sound or with one character changed when none is named as written (`link_matches`)."""
        return list(dict.fromkeys(m.disease for m in self.link_matches(text, fuzzy)))

    def link_matches(self, text: str, fuzzy: bool = False) -> list[Match]:
        """The entries `text` names, in order of appearance: its names, aliases and usage words, the longest first and
        without overlaps (so 急性肾盂肾炎 wins over 肾炎 inside it, 感染性心内膜炎 over the 上感 of 患上感染…, and a `not`
        word such as 丙肝 hides the 肝 words in it); a word of Latin letters only where it stands alone (SLE, not the
        `as` of `was`). With `fuzzy`, a text that names
        none links to a name of 3+ characters it contains written with other characters of the same sound (唐尿病),
        else to the one name of 5+ characters it contains with one character changed (rapidfuzz partial_ratio ≥
        FUZZY_CUTOFF; a tie links none)."""
        said = normalise(text)
        spans = []  # every place a form occurs (one automaton pass), then the longest first without overlaps
        for end, form in self._automaton.iter(said) if self._names else ():
            start = end - len(form) + 1
            if form.isascii() and ((start > 0 and said[start - 1].isascii() and said[start - 1].isalnum())
                                   or (end + 1 < len(said) and said[end + 1].isascii() and said[end + 1].isalnum())):
                continue
            spans.append((start, end + 1, form))
        taken = []
        for start, stop, form in sorted(spans, key=lambda span: (span[0] - span[1], span[0])):
            if not any(start < b and a < stop for a, b, _ in taken):
                taken.append((start, stop, form))
        found = []
        for _, _, form in sorted(taken):
            why, names = self._names[form]
            found += [Match(name, why, 1.0 if rank == 0 else 0.9) for rank, name in enumerate(names)]
        if not found and fuzzy:
            found = self._sound_link(said) or self._fuzzy_link(said)
        return _unique(found)

    def _sound_link(self, said: str) -> list[Match]:
        table = self._sounds
        if not table or said.isascii():
            return []
        code = _sound_code(said)
        found = []
        for _, key in table[1].iter_long(code):
            why, names = self._names[table[0][key]]
            found += [Match(name, "sound", 0.8) for name in names]
        return found

    @cached_property
    def _sounds(self):
        """({sound code: form}, automaton over the codes) for the linking forms of SOUND_MIN_CHARS+ Chinese
        characters."""
        codes = {}
        for form, (_, names) in self._names.items():
            if names and len(form) >= SOUND_MIN_CHARS and not any(c.isascii() for c in form):
                codes.setdefault(_sound_code(form), form)
        return (codes, _automaton(codes)) if codes else None

    def _fuzzy_link(self, said: str) -> list[Match]:
        from rapidfuzz import fuzz, process

        pairs = {said[i:i + 2] for i in range(len(said) - 1)}
        # only forms sharing a character pair with the text can match with one character changed (5+ characters
        # keep 2+ of their pairs); scoring thousands of CMeKG forms for every question was most of retrieval's time
        places = self._fuzzy_pairs
        candidates = sorted({form for pair in pairs for form in places.get(pair, ())}, key=places[""].get)
        best = process.extract(said, candidates, scorer=fuzz.partial_ratio, score_cutoff=FUZZY_CUTOFF, limit=2)
        if not best or (len(best) == 2 and best[1][1] == best[0][1]
                        and self._names[best[1][0]][1] != self._names[best[0][0]][1]):
            return []
        return [Match(name, "fuzzy", best[0][1] / 100) for name in self._names[best[0][0]][1]]

    @cached_property
    def _fuzzy_pairs(self) -> dict[str, set[str]]:
        """Character pair -> the fuzzy forms holding it; "" -> {form: its place in _fuzzy_forms} (the order kept)."""
        pairs: dict = {"": {form: place for place, form in enumerate(self._fuzzy_forms)}}
        for form in self._fuzzy_forms:
            for i in range(len(form) - 1):
                pairs.setdefault(form[i:i + 2], set()).add(form)
        return pairs

    # --- ranking: the diseases a description may point to --------------------------------------------------------

    def describe(self, text: str, limit: int = 2) -> list[Match]:
        """The entries whose items (symptoms, drugs, examinations, causes, …) a description shares most, ranked by
        BM25 over the question's terms (each item found in it, by any of its wordings, is one term; `jieba` cuts
        the rest); the best one only, and [] below the confidence bar (MIN_DESCRIPTION_SCORE, LEAD,
        MIN_SHARED_TERMS). A drug named in full in a question that asks what it is for links as `items` and is not a
        mere possibility; a description's symptoms give possibilities."""
        terms = self._ranker.terms(text)
        if not terms:
            return []
        if re.search(ASKS_USE, text):  # what a drug is for: the entries that list a drug it names, firmly
            firm = self._drug_users(terms)
            if firm:
                return [Match(d, "items") for d in firm[:limit]]
        scored = self._ranker.score(terms)
        if not scored:
            return []
        (best, top, shared), runner_up = scored[0], (scored[1][1] if len(scored) > 1 else 0.0)
        if top >= MIN_DESCRIPTION_SCORE and top >= LEAD * runner_up and len(shared) >= MIN_SHARED_TERMS:
            return [Match(best, "items", top, possible=True)]
        return []

    def _drug_users(self, terms: list[str]) -> list[str]:
        """The entries listing a drug among `terms` (named in full, 3+ characters), those listing it earlier (a
        first-line drug) first, then by name."""
        rank = {}
        for term in terms:
            for name, place in self._drug_places.get(term, {}).items() if len(term) >= 3 else ():
                rank[name] = min(place, rank.get(name, place))
        return sorted(rank, key=lambda name: (rank[name], name))

    @cached_property
    def _drug_places(self) -> dict[str, dict[str, int]]:
        """Normalised drug -> {entry: the drug's place in the entry's list} (its first place)."""
        places: dict[str, dict[str, int]] = {}
        for name in self.diseases:
            for place, drug in enumerate(normalise(x) for x in self.items(name, "drugs")):
                places.setdefault(drug, {}).setdefault(name, place)
        return places

    @cached_property
    def _ranker(self) -> "_Ranker":
        return _Ranker(self)

    # --- what is asked, and the facts --------------------------------------------------------------------------

    def asked_attribute(self, question: str) -> str | None:
        """The one attribute a question asks for, or None when it asks for none or several."""
        hits = asked_attributes(question)
        return hits[0] if len(hits) == 1 else None

    @staticmethod
    def asked_attributes(question: str) -> list[str]:
        return asked_attributes(question)

    def names(self, text: str, item: str) -> bool:
        """Whether `text` names `item` (exactly, by synonym or alias, or with one character changed)."""
        said = normalise(text)
        forms = self.forms(item)
        if any(form in said for form in forms):
            return True
        from rapidfuzz import fuzz

        return any(len(form) >= 5 and fuzz.partial_ratio(form, said) >= 80 for form in forms)

    def terms(self, text: str, attribute: str) -> set[str]:
        """The knowledge-base items of `attribute` (over all diseases) that `text` names, by exact wording; a term
        inside a longer named term (沙美特罗 in 沙美特罗替卡松) is not counted twice."""
        said = normalise(text)
        found = [form for form in self._vocab.get(attribute, {}) if form in said]
        kept = [f for f in found if not any(f != g and f in g for g in found)]
        return {self._vocab[attribute][f] for f in kept}

    def retrieve(self, question: str, max_diseases: int = 2, context=()) -> "Retrieved":
        """The facts a question needs. Diseases: those it names (`link_matches`, by name, alias, usage, generic
        word, sound or one changed character), else those the nearest of the earlier turns in `context` (newest
        first) names (a follow-up such as 它用什么药 is about the disease of the conversation), else, for a
        question that asks which disease (or department, or what a drug is for) or describes symptoms at length,
        the entries its description points to (`describe`: ranked, with a confidence bar, shown as possibilities).
        For each: the department, and the attributes it asks for (up to three; every attribute for 介绍/怎么回事;
        the department, symptoms and drugs when it asks for none in particular); aliases and ICD chapter when
        asked. Lists are cut at MAX_ITEMS items."""
        matches = self.link_matches(question, fuzzy=True)[:max_diseases]
        for earlier in context:
            if matches:
                break
            matches = [Match(m.disease, "context", m.score, m.possible)
                       for m in self.link_matches(earlier, fuzzy=True)[:max_diseases]]
        asked = self.asked_attributes(question)
        matched: dict[str, list[str]] = {}
        if not matches and (re.search(ASKS_DISEASE, question) or len(normalise(question)) >= 30):
            matches = self.describe(question, max_diseases)
            terms = self._ranker.terms(question) if matches else []
            matched = {m.disease: self._ranker.keys_of(terms, m.disease) for m in matches}
        diseases = [m.disease for m in matches]
        if re.search(ASKS_ALL, question):
            keys = list(ATTRIBUTES)
        else:
            keys = ["department", *asked] if 0 < len(asked) <= 3 else list(DEFAULT_KEYS)
        keys += [key for key, pattern in ASKS_EXTRA.items() if re.search(pattern, question)]
        keys = [key for key in dict.fromkeys(keys)]
        facts = [(d, key, self.items(d, key)[:MAX_ITEMS]) for d in diseases
                 for key in dict.fromkeys([*keys, *matched.get(d, [])]) if self.items(d, key)]
        return Retrieved(diseases, asked[0] if len(asked) == 1 else None, facts, matches, red_flags_in(question))

    def retrieve_turn(self, instruction: str, input: str = "", history=()) -> "Retrieved":
        """`retrieve` for a record's last turn: its instruction (and input), a follow-up's disease from the earlier
        user turns of `history`, newest first. The one way training and inference put a turn to the retriever."""
        return self.retrieve(f"{instruction}\n{input}" if input else instruction,
                             context=[user for user, _ in reversed(history)])

    def facts(self, diseases: list[str], keys) -> list[tuple[str, str, list[str]]]:
        return [(d, key, self.items(d, key)[:MAX_ITEMS]) for d in diseases for key in keys if self.items(d, key)]

    @cached_property
    def sha256(self) -> str:
        """The content hash of the knowledge, its linking words and the red flags' words (recorded in an adapter's
        medlora.json)."""
        text = json.dumps([sorted(self.diseases.values(), key=lambda d: d["name"]), sorted(self._names.items()),
                           _red_flag_words()], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, source: str) -> "KnowledgeIndex":
        """`kb`, `cmekg`, `both`, or a JSONL/YAML file of knowledge records."""
        if source in ("kb", "cmekg", "both"):
            return _source(source)
        return cls(read_knowledge_file(source))


class _Ranker:
    """BM25 (bm25s, Lucene's variant) over each entry's items, one document an entry. Terms: each item whole, and
    its words as jieba cuts them (for search: 咳嗽咳痰超过2周 also gives 咳嗽, 咳痰). A question's terms: every item it
    names by any wording (拉肚子 is 腹泻; longest first, without overlaps), then the jieba words of the question that
    some document holds; the items are in jieba's dictionary, so documents and questions are cut alike."""

    def __init__(self, index: KnowledgeIndex):
        import bm25s
        import jieba

        self.index = index
        self.names = sorted(index.diseases)
        self.item_forms: dict[str, str] = {}  # normalised wording -> normalised item
        self.keys: dict[tuple[str, str], list[str]] = {}  # (disease, term) -> attributes holding it
        self.cutter = jieba.Tokenizer()
        items = {normalise(item) for name in self.names for key in RANKED_ATTRIBUTES
                 for item in index.items(name, key)}
        for item in sorted(items):
            if len(item) >= 2:
                self.cutter.add_word(item)
        docs = []
        for name in self.names:
            doc = []
            for key in RANKED_ATTRIBUTES:
                for item in index.items(name, key):
                    term = normalise(item)
                    if len(term) < 2:
                        continue
                    for form in index.forms(item):
                        if len(form) >= 2:
                            self.item_forms.setdefault(form, term)
                    for word in dict.fromkeys([term, *self.words(term)]):
                        doc.append(word)
                        self.keys.setdefault((name, word), []).append(key)
            docs.append(doc)
        self.automaton = _automaton(self.item_forms)
        self.vocab = {term: i for i, term in enumerate(sorted({t for doc in docs for t in doc}))}
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenization.Tokenized(ids=[[self.vocab[t] for t in doc] for doc in docs],
                                                          vocab=self.vocab), show_progress=False)

    def words(self, text: str) -> list[str]:
        """jieba's words of 2+ characters (search mode), each in its canonical wording (发烧 → 发热)."""
        return [canonical(w) for w in self.cutter.lcut_for_search(text) if len(w) >= 2]

    def terms(self, text: str) -> list[str]:
        """The terms of a text that some document holds: the items it names, then its words; each once."""
        said = normalise(text)
        found = [self.item_forms[form] for _, form in self.automaton.iter_long(said)] if self.item_forms else []
        return [t for t in dict.fromkeys([*found, *self.words(said)]) if t in self.vocab]

    def score(self, terms: list[str]) -> list[tuple[str, float, set[str]]]:
        """(disease, BM25 score, the terms its document holds), best first (ties by name), the first 8."""
        import numpy as np

        scores = np.asarray(self.retriever.get_scores([self.vocab[t] for t in terms]), dtype=float)
        # names are sorted, so a stable sort by score keeps ties in name order
        order = [int(i) for i in np.argsort(-scores, kind="stable")[:8] if scores[i] > 0]
        return [(self.names[i], float(scores[i]), {t for t in terms if (self.names[i], t) in self.keys})
                for i in order[:8]]

    def keys_of(self, terms: list[str], disease: str) -> list[str]:
        """The attributes of `disease` holding the question's `terms` (shown beside the asked ones)."""
        return list(dict.fromkeys(key for term in terms for key in self.keys.get((disease, term), [])))


def _usage_forms(usage: dict):
    """(word, why, diseases) for each word of a usage table (kb/usage.yaml)."""
    for word, name in (usage.get("names") or {}).items():
        yield str(word), "usage", [name]
    for word, names in (usage.get("generic") or {}).items():
        yield str(word), "generic", list(names)
    for word in usage.get("not") or []:
        yield str(word), "not", []


def _automaton(words):
    """An Aho-Corasick automaton (pyahocorasick) whose matches give back the word."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for word in words:
        automaton.add_word(word, word)
    if len(automaton):
        automaton.make_automaton()
    return automaton


_SYLLABLES: dict[str, str] = {}  # syllable -> its private-use character, given out in order of first use
# Sounds many speakers do not tell apart, written alike (帕金深 for 帕金森, 兰尾炎 for 阑尾炎, 流脑 for 牛脑 ...): zh/z,
# ch/c, sh/s, n/l at the start, and -ng/-n at the end.
_LOOSE = {"zh": "z", "ch": "c", "sh": "s", "n": "l", "ng": "n"}
_LOOSE_SOUNDS = re.compile(r"^(?:zh|ch|sh|n(?!g))|ng$")


def _sound_code(text: str) -> str:
    """One private-use character per syllable (pinyin without tone, loose sounds alike: _LOOSE), so that an automaton
    can match sounds: 唐尿病 and 糖尿病 have one code. Other characters stay as they are."""
    return "".join(_sound_char(char) if "\u4e00" <= char <= "\u9fff" else char for char in text)


@lru_cache(maxsize=None)
def _sound_char(char: str) -> str:
    """A Chinese character's sound as one private-use character (cached: pypinyin costs ~30 µs a character)."""
    from pypinyin import lazy_pinyin

    syllable = _LOOSE_SOUNDS.sub(lambda m: _LOOSE[m.group(0)], lazy_pinyin(char)[0])
    return _SYLLABLES.setdefault(syllable, chr(0xE000 + len(_SYLLABLES)))


def red_flags_in(text: str, most: int = 2) -> list[str]:
    """The clinical red flags (kb/red_flags.yaml's `flag`) whose patients' words `text` contains, in the list's
    order, at most `most`: retrieval shows them to the model as `急症信号：…` lines, whatever the knowledge source."""
    automaton, flags, order = _red_flag_matcher()
    found = {flags[word] for _, word in automaton.iter(normalise(text))} if len(automaton) else set()
    return sorted(found, key=order.__getitem__)[:most]


@lru_cache(maxsize=1)
def _red_flag_words() -> list[list[str]]:
    from medlora.kb import red_flags

    return [[group["flag"], *group["words"]] for group in red_flags()]


@lru_cache(maxsize=1)
def _red_flag_matcher():
    """An automaton over the red flags' normalised words, {word: flag} (a word of two groups: the first), and
    {flag: its place in the list}."""
    flags: dict[str, str] = {}
    order: dict[str, int] = {}
    for flag, *words in _red_flag_words():
        order.setdefault(flag, len(order))
        for word in words:
            if normalise(str(word)):
                flags.setdefault(normalise(str(word)), flag)
    return _automaton(flags), flags, order


def _unique(matches: list[Match]) -> list[Match]:
    seen, out = set(), []
    for m in matches:
        if m.disease not in seen:
            seen.add(m.disease)
            out.append(m)
    return out


@dataclass
class Retrieved:
    """What `KnowledgeIndex.retrieve` found: the linked diseases, the attribute asked, (disease, attribute, items)
    facts, for each disease how it matched (`Match`: why, score, whether only a possibility), and the clinical red
    flags the question shows (`red_flags_in`)."""

    diseases: list[str]
    attribute: str | None
    facts: list[tuple[str, str, list[str]]] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def possible(self, disease: str) -> bool:
        return any(m.disease == disease and m.possible for m in self.matches)

    def text(self) -> str:
        """The facts as short lines (`支气管哮喘·常用药物：沙丁胺醇、孟鲁司特`), after a `急症信号：…` line for each red
        flag the question shows; empty when nothing was found. A possibility for a description is marked
        (`可能相关：…`), never shown as the patient's disease."""
        return "\n".join([*(f"{RED_FLAG}：{flag}" for flag in self.flags),
                          *(f"{POSSIBLE + '：' if self.possible(d) else ''}{d}·{LABELS[key]}：{'、'.join(items)}"
                            for d, key, items in self.facts)])

    def why(self) -> str:
        """How each entry matched, for people (`2型糖尿病 (generic, 1.00)`)."""
        return "；".join(f"{m.disease}（{POSSIBLE if m.possible else m.why}，{m.score:.2f}）" for m in self.matches)

    @classmethod
    def from_dict(cls, data: dict) -> "Retrieved":
        return cls(list(data.get("diseases", [])), data.get("attribute"),
                   [(f["disease"], f["attribute"], list(f["items"])) for f in data.get("facts", [])],
                   [Match(m["disease"], m.get("why", "name"), float(m.get("score", 1.0)), bool(m.get("possible")))
                    for m in data.get("matches", [])], list(data.get("flags", [])))

    def to_dict(self) -> dict:
        """The entries as results.jsonl, the server's `medlora_knowledge` field and the web page show them."""
        return {"diseases": self.diseases, "attribute": self.attribute,
                "facts": [{"disease": d, "attribute": key, "items": items} for d, key, items in self.facts],
                "matches": [m.to_dict() for m in self.matches], "flags": self.flags}


def read_knowledge_file(path: str | Path) -> list[dict]:
    """A user's knowledge: JSONL (one record a line) or YAML (a list) of `{name, aliases, <attribute>: [items]}`
    with attributes from ATTRIBUTES (`department` a string); one DataError line naming file, record and field."""
    import yaml

    from medlora.data import read_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such knowledge file (or give kb, cmekg or both)")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: not readable YAML ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a YAML knowledge file must be a list of records")
        rows = [(f"record {i}", row) for i, row in enumerate(data, 1)]
    else:
        rows = list(read_rows(path))
    records, seen = [], set()
    for where, row in rows:
        record = _knowledge_record(row, f"{path}: {where}")
        if record["name"] in seen:
            raise DataError(f"{path}: {where}: field 'name' repeats {record['name']!r}")
        seen.add(record["name"])
        records.append(record)
    if not records:
        raise DataError(f"{path}: no knowledge records")
    return records


def _knowledge_record(row, where: str) -> dict:
    from medlora.kb import check_entry_text

    if not isinstance(row, dict):
        raise DataError(f"{where}: a knowledge record must be an object, got {type(row).__name__}")
    name = row.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: field 'name' must be a non-empty string")
    record = {"name": name.strip()}
    for key, value in row.items():
        if key == "name":
            continue
        if key != "aliases" and key not in ATTRIBUTES:
            raise DataError(f"{where}: field {key!r} is not one of aliases, {', '.join(ATTRIBUTES)}"[:300])
        if key == "department" and isinstance(value, str) and value.strip():
            record[key] = value.strip()
        elif isinstance(value, list) and value and all(isinstance(x, str) and x.strip() for x in value):
            record[key] = [x.strip() for x in value]
        else:
            raise DataError(f"{where}: field {key!r} must be a non-empty list of strings")
    check_entry_text(record, where)
    return record


@lru_cache(maxsize=3)
def _source(name: str) -> KnowledgeIndex:
    from medlora.kb import load_sources

    return KnowledgeIndex(load_sources(name), usage_table() if name != "cmekg" else None)


@lru_cache(maxsize=4)
def _builtin(kb_dir: str | None) -> KnowledgeIndex:
    from medlora.kb import load_knowledge_base

    return KnowledgeIndex(load_knowledge_base(kb_dir), usage_table())


def usage_names(disease: str) -> list[str]:
    """The words of kb/usage.yaml that mean `disease` (高血压, 血压高 for 原发性高血压; a generic word whose first entry
    it is: 糖尿病 for 2型糖尿病), in the table's order."""
    table = usage_table()
    return [str(word) for word, name in (table.get("names") or {}).items() if name == disease] + \
        [str(word) for word, names in (table.get("generic") or {}).items() if names[0] == disease]


@lru_cache(maxsize=1)
def usage_table() -> dict:
    """kb/usage.yaml: the words people use for the curated entries (names, generic words, and `not` words)."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "kb" / "usage.yaml").read_text(encoding="utf-8"))
