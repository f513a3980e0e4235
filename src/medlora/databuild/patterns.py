"""Knowledge patterns: each is `(index, disease, rng) -> (instruction, output)`, or None where the disease lacks the
facts it needs. Questions and answers come from the phrasing tables in many wordings; every answer states only
facts of the knowledge base and carries nothing of another answer form (no option talk, no `X是Y的别称` unless the
question asks for another name)."""

from __future__ import annotations

import random

from medlora.databuild.index import Index, any_overlap, chapter_parts, distinct, join, person, pick, shown
from medlora.databuild.phrasing import phrasing
from medlora.knowledge import usage_names

# the attribute patterns: pattern name -> knowledge-base key
ATTRIBUTE_PATTERNS = {
    "cause": "causes", "symptom": "symptoms", "examination": "examinations", "treatment": "treatments",
    "drug": "drugs", "complication": "complications", "prevention": "prevention", "high_risk": "high_risk_groups",
    "transmission": "transmission", "department": "department",
}
# conditions for which "要不要紧" cannot be answered with "usually controllable with timely treatment"
GRAVE = ("狂犬病", "羊水栓塞")


def attribute_answer(d: dict, key: str, rng: random.Random) -> str | None:
    """One wording of the answer to "what is `key` of `d`", or None when the disease has no such facts."""
    if not d.get(key):
        return None
    answers = phrasing()["attributes"][key]["answers"]
    if key == "department":
        return pick(rng, answers, name=d["name"], department=d["department"])
    return pick(rng, answers, name=d["name"], items=join(d[key]))


def _attribute(key: str):
    def build(ix: Index, d: dict, rng: random.Random):
        answer = attribute_answer(d, key, rng)
        if answer is None:
            return None
        return pick(rng, phrasing()["attributes"][key]["questions"], name=d["name"]), answer

    return build


def _combo(ix, d, rng):
    """Two attributes in one question; the answer is the two single answers."""
    combos = [c for c in phrasing()["combos"] if all(d.get(key) for key in c["attributes"])]
    if not combos:
        return None
    combo = rng.choice(combos)
    first, second = (attribute_answer(d, key, rng) for key in combo["attributes"])
    return combo["question"].format(name=d["name"]), f"{first}{combo['joiner']}{second}"


def _patient_symptoms(ix, d, rng):
    """A patient names some symptoms; the answer names the disease as one possibility, its other symptoms, and the
    department that can confirm it."""
    symptoms = shown(d)
    if len(symptoms) < 3 or not d.get("department"):
        return None
    k = 2 if len(symptoms) < 5 else 3
    told = [symptoms[i] for i in sorted(rng.sample(range(len(symptoms)), k))]
    others = [s for s in symptoms if s not in told]
    table = phrasing()["patient_symptoms"]
    values = {"name": d["name"], "symptoms": join(told), "others": join(others), "department": d["department"]}
    return pick(rng, table["questions"], **values), pick(rng, table["answers"], **values)


def _serious(ix, d, rng):
    if not d.get("complications") or not d.get("department") or d["name"] in GRAVE:
        return None
    table = phrasing()["serious"]
    values = {"name": d["name"], "complications": join(d["complications"][:3]), "department": d["department"]}
    return pick(rng, table["questions"], **values), pick(rng, table["answers"], **values)


def _chapter(ix, d, rng):
    if not d.get("icd10_chapter"):
        return None
    number, title = chapter_parts(d["icd10_chapter"])
    q = pick(rng, ["{d}在ICD-10中属于哪一类疾病？", "按ICD-10分类，{d}归入哪一章？", "{d}的ICD-10编码在哪一章？"],
             d=d["name"])
    return q, f"{d['name']}属于ICD-10第{number}章“{title}”。"


def _diagnosis(ix, d, rng):
    if not d.get("symptoms") or not d.get("examinations"):
        return None
    q = pick(rng, ["{d}的诊断思路是什么？", "怎样诊断{d}？", "临床上如何判断是否患了{d}？", "怀疑自己得了{d}，医生一般怎么确诊？"],
             d=d["name"])
    return q, (f"诊断{d['name']}时，先看是否有{join(d['symptoms'])}等典型表现，"
               f"再通过{join(d['examinations'])}等检查明确诊断。")


def _overview(ix, d, rng):
    if not all(d.get(key) for key in ("icd10_chapter", "department", "causes", "symptoms", "treatments")):
        return None
    _, title = chapter_parts(d["icd10_chapter"])
    q = pick(rng, ["请全面介绍一下{d}。", "{d}是一种什么病？", "请简要介绍{d}的病因、症状和治疗。", "我想了解{d}，能介绍一下吗？",
                   "给我科普一下{d}吧。"], d=d["name"])
    return q, (f"{d['name']}属于{title}，一般到{d['department']}就诊。常见病因有{join(d['causes'])}。"
               f"典型症状包括{join(d['symptoms'])}。治疗方法有{join(d['treatments'])}。")


def _vignette(ix, d, rng):
    symptoms = shown(d)
    if not symptoms or not d.get("examinations"):
        return None
    told = [symptoms[i] for i in sorted(rng.sample(range(len(symptoms)), min(3, len(symptoms))))]
    q = pick(rng, ["{p}，出现{s}，可能是什么病？应做哪些检查？", "{p}，主诉{s}。最可能的诊断是什么？需要做哪些检查？",
                   "{p}，近期出现{s}，考虑什么疾病？建议做什么检查？"], p=person(d, rng), s=join(told))
    exams = join(d["examinations"][:3])
    return q, pick(rng, ["可能是{d}。建议做{e}。", "考虑{d}的可能。建议做{e}等检查以明确诊断。",
                         "首先考虑{d}，但需要检查确认，建议做{e}。"], d=d["name"], e=exams)


def reverse_drug_item(ix: Index, d: dict) -> str | None:
    """The drug a `reverse_drug` record of `d` asks about: the one fewest other diseases use."""
    if not d.get("drugs"):
        return None
    return min(d["drugs"], key=lambda x: (len(ix.users("drugs", x)), d["drugs"].index(x)))


def drug_use(drug: str, diseases: list[str], rng: random.Random) -> tuple[str, str]:
    """drug → diseases, with the advice to use it under a doctor's or pharmacist's guidance."""
    table = phrasing()["drug_use"]
    named = join(diseases) + ("等疾病" if len(diseases) > 1 else "")
    return pick(rng, table["questions"], drug=drug), pick(rng, table["answers"], drug=drug, diseases=named)


def _reverse_drug(ix, d, rng):
    drug = reverse_drug_item(ix, d)
    if drug is None:
        return None
    others = [o["name"] for o in ix.users("drugs", drug) if o["name"] != d["name"]]
    return drug_use(drug, [d["name"], *others[:3]], rng)


def _reverse_cause(ix, d, rng):
    if not d.get("causes"):
        return None
    cause = min(d["causes"], key=lambda x: (len(ix.users("causes", x)), d["causes"].index(x)))
    others = [o["name"] for o in ix.users("causes", cause) if o["name"] != d["name"]]
    if len(others) > 2:
        return None
    q = pick(rng, ["{x}可能导致哪种疾病？", "哪种疾病与{x}有关？", "{x}是哪种疾病的常见病因？"], x=cause)
    if not others:
        return q, f"{cause}是{d['name']}的常见病因之一。"
    return q, f"{cause}是{join([d['name'], *others])}等疾病的常见病因。"


def _alias(ix, d, rng):
    """Another name: asked for (the answer lists them), or used in a question (the answer says what it is)."""
    aliases = [a for a in d.get("aliases", []) if a in ix.unique_aliases]
    if not aliases:
        return None
    alias = rng.choice(aliases)
    if rng.random() < 0.34:
        q = pick(rng, ["{d}还有什么别称？", "{d}又叫什么？", "{d}有别的叫法吗？"], d=d["name"])
        return q, f"{d['name']}又称{join(aliases)}。"
    q = pick(rng, ["{a}是什么病？", "{a}指的是哪种疾病？", "常听人说{a}，这是什么病？"], a=alias)
    described = f"，常见症状有{join(d['symptoms'][:3])}" if d.get("symptoms") else ""
    return q, f"{alias}就是{d['name']}{described}，一般到{d['department']}就诊。"


def _partner(ix: Index, d: dict, rng: random.Random, key: str) -> dict | None:
    """Another disease to compare `d` with on `key`, when both have that list."""
    other = ix.partner(d, rng)
    return other if other is not None and d.get(key) and other.get(key) else None


def _compare_cause(ix, d, rng):
    other = _partner(ix, d, rng, "causes")
    if other is None:
        return None
    a, b, ca, cb = d["name"], other["name"], d["causes"], other["causes"]
    q = pick(rng, ["{a}和{b}的病因是否一致？", "{a}与{b}的病因相同吗？", "比较{a}和{b}的病因，二者一样吗？"], a=a, b=b)
    common = [c for c in ca if c in cb]
    if set(ca) == set(cb):
        return q, f"一致，{a}和{b}的病因都是{join(ca)}。"
    if not common:
        return q, f"不一致，{a}的病因是{join(ca)}，而{b}的病因是{join(cb)}。"
    return q, f"不完全一致，二者都可由{join(common)}引起；{a}的病因是{join(ca)}，而{b}的病因是{join(cb)}。"


def _compare_symptom(ix, d, rng):
    other = _partner(ix, d, rng, "symptoms")
    if other is None:
        return None
    a, b = d["name"], other["name"]
    q = pick(rng, ["{a}和{b}的症状有什么不同？", "如何从症状上区分{a}和{b}？", "{a}与{b}的临床表现有何区别？"], a=a, b=b)
    answer = f"{a}主要表现为{join(d['symptoms'])}，而{b}主要表现为{join(other['symptoms'])}。"
    common = [s for s in d["symptoms"] if s in other["symptoms"]]
    if common:
        answer += f"两者都可出现{join(common)}。"
    return q, answer


def _triage(ix, d, rng):
    symptoms = shown(d)
    pairs = [(symptoms[i], symptoms[j]) for i in range(len(symptoms)) for j in range(i + 1, len(symptoms))]
    rng.shuffle(pairs)
    for x, y in pairs:
        elsewhere = [o for o in ix.diseases if o.get("department") != d.get("department")
                     and any_overlap([x], o.get("symptoms", [])) and any_overlap([y], o.get("symptoms", []))]
        if not elsewhere:
            q = pick(rng, ["出现{x}和{y}应该去哪个科室就诊？", "最近{x}，还伴有{y}，该挂哪个科？",
                           "{x}伴{y}，应该看什么科？"], x=x, y=y)
            return q, f"建议到{d['department']}就诊，需考虑{d['name']}等疾病的可能。"
    return None


_JUDGE = ["{x}是{d}的常见症状吗？", "{d}会出现{x}吗？", "判断：{x}是{d}的典型表现之一，对吗？", "得了{d}会{x}吗？"]


def _judge_true(ix, d, rng):
    if not shown(d):
        return None
    x = rng.choice(shown(d))
    return pick(rng, _JUDGE, x=x, d=d["name"]), f"是的，{x}是{d['name']}的常见症状之一。"


def _judge_false(ix, d, rng):
    if not d.get("symptoms"):
        return None
    avoid = [*d["symptoms"], *d.get("complications", []), d["name"]]
    pool = [s for o in ix.others(d) if o.get("icd10_chapter") != d.get("icd10_chapter")
            for s in ix.specific_unique(o, "symptoms")]
    chosen = distinct(rng, pool, 1, avoid)
    if chosen is None:
        return None
    return pick(rng, _JUDGE, x=chosen[0], d=d["name"]), f"不是。{d['name']}的常见症状是{join(d['symptoms'])}。"


def _prevention_advice(ix, d, rng):
    if not d.get("prevention") or not shown(d):
        return None
    advice = f"建议{join(d['prevention'])}。如出现{join(shown(d)[:2])}等症状，应及时到{d['department']}就诊。"
    if d.get("high_risk_groups"):
        group = rng.choice(d["high_risk_groups"])
        q = pick(rng, ["作为{g}，日常生活中应如何预防{d}？", "{g}怎样降低患{d}的风险？"], g=group, d=d["name"])
        return q, f"{group}是{d['name']}的高危人群，{advice}"
    q = pick(rng, ["日常生活中怎样做才能远离{d}？", "有什么建议可以帮助预防{d}吗？"], d=d["name"])
    return q, f"预防{d['name']}，{advice}"


# what a patient asking inside a narrative wants to know: the knowledge-base attributes a plain answer can give
_NARRATIVE_KEYS = ("drugs", "treatments", "prevention", "complications", "examinations", "causes", "symptoms")


def _narrative(ix, d, rng):
    """A patient's or relative's own account (a hand-written frame: who, how long, what was done) naming the disease
    as people do (高血压 for 原发性高血压, from kb/usage.yaml), then one attribute question; the answer is that
    attribute's plain answer: a diagnosed, stable illness is no emergency."""
    keys = [key for key in _NARRATIVE_KEYS if d.get(key)]
    if not keys:
        return None
    key = rng.choice(keys)
    said = rng.choice([d["name"], *usage_names(d["name"])])
    frame = rng.choice(phrasing()["frames"]).format(name=said)
    question = pick(rng, phrasing()["attributes"][key]["questions"], name=said)
    return f"{frame}{question}", attribute_answer(d, key, rng)


PATTERNS = {
    **{name: _attribute(key) for name, key in ATTRIBUTE_PATTERNS.items()},
    "narrative": _narrative,
    "combo": _combo,
    "combo2": _combo,
    "patient_symptoms": _patient_symptoms,
    "serious": _serious,
    "chapter": _chapter,
    "diagnosis": _diagnosis,
    "overview": _overview,
    "vignette": _vignette,
    "reverse_drug": _reverse_drug,
    "reverse_cause": _reverse_cause,
    "alias": _alias,
    "compare_cause": _compare_cause,
    "compare_symptom": _compare_symptom,
    "triage": _triage,
    "judge_true": _judge_true,
    "judge_false": _judge_false,
    "prevention_advice": _prevention_advice,
}
# patterns whose training pairs come in several wordings (question and answer drawn again)
VARIED = frozenset([*ATTRIBUTE_PATTERNS, "combo", "combo2", "patient_symptoms", "serious", "alias", "vignette",
                    "narrative"])

