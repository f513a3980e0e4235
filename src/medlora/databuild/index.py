"""Look-ups over the diseases of a build (distractors, reverse look-ups, comparison partners) and small helpers
that every family of patterns uses."""

from __future__ import annotations

import random
import re
from collections import Counter


def join(items) -> str:
    return "、".join(items)


def overlap(a: str, b: str) -> bool:
    """The same fact, or one phrase contained in the other (发热 / 高热不退)."""
    return a == b or (len(a) >= 2 and a in b) or (len(b) >= 2 and b in a)


def any_overlap(items_a, items_b) -> bool:
    return any(a == b or (len(a) > 1 and a in b) or (len(b) > 1 and b in a) for a in items_a for b in items_b)


def chapter_parts(chapter: str) -> tuple[str, str]:
    number, _, title = chapter.partition(" ")
    return number, title


class Index:
    """Look-ups over the whole KB, for distractors, reverse lookups and comparisons."""

    def __init__(self, diseases: list[dict]):
        self.diseases = diseases
        self.names = [d["name"] for d in diseases]
        self.departments = sorted({d["department"] for d in diseases})
        self.chapter_departments: dict[str, set[str]] = {}
        for d in diseases:
            self.chapter_departments.setdefault(d["icd10_chapter"], set()).add(d["department"])
        alias_count = Counter(a for d in diseases for a in set(d.get("aliases", [])))
        self.unique_aliases = {a for a, n in alias_count.items() if n == 1 and a not in self.names}

        self._users: dict = {}
        self._items: dict[str, list[tuple[str, int]]] = {}

    def users(self, field: str, item: str) -> list[dict]:
        """Diseases whose `field` list mentions `item` (exactly or as a contained phrase)."""
        key = (field, item)
        if key not in self._users:
            if field not in self._items:
                self._items[field] = [(x, i) for i, d in enumerate(self.diseases) for x in d.get(field, [])]
            many = len(item) > 1
            hits = sorted({i for x, i in self._items[field]
                           if x == item or (many and item in x) or (len(x) > 1 and x in item)})
            self._users[key] = [self.diseases[i] for i in hits]
        return self._users[key]

    def unique(self, field: str) -> set[str]:
        """The `field` items that only one disease mentions."""
        key = ("unique", field)
        if key not in self._users:
            items = {x for d in self.diseases for x in d.get(field, [])}
            self._users[key] = {x for x in items if len(self.users(field, x)) == 1}
        return self._users[key]

    def specific_unique(self, d: dict, field: str) -> list[str]:
        """`d`'s causes or shown symptoms that are neither broad (see _GENERIC_*) nor mentioned by another disease."""
        key = ("specific", field, d["name"])
        if key not in self._users:
            items, generic = (shown(d), GENERIC_SYMPTOMS) if field == "symptoms" else (d.get(field, []), GENERIC_CAUSES)
            unique = self.unique(field)
            self._users[key] = [x for x in specific(items, generic) if x in unique]
        return self._users[key]

    def others(self, d: dict) -> list[dict]:
        """The other diseases, less those whose names contain each other (糖尿病 / 糖尿病视网膜病变)."""
        key = ("others", d["name"])
        if key not in self._users:
            self._users[key] = [o for o in self.diseases if o["name"] != d["name"]
                                and not overlap(o["name"], d["name"])]
        return self._users[key]

    def partner(self, d: dict, rng: random.Random) -> dict | None:
        """Another disease to compare with: one of the same chapter when there is one."""
        pool = [o for o in self.others(d) if o["icd10_chapter"] == d["icd10_chapter"]] or self.others(d)
        return rng.choice(pool) if pool else None


def shown(d: dict) -> list[str]:
    """Symptoms a patient can present with ("多数无明显症状" is not one)."""
    symptoms = d.get("symptoms", [])
    return [s for s in symptoms if "无明显症状" not in s and "无症状" not in s] or symptoms


# Broad factors and symptoms that many diseases share although the KB lists them for few: never used as a
# distractor cause, a "false" symptom, or (where avoidable) the cited symptom of a multiple-choice question.
GENERIC_CAUSES = ("遗传", "环境", "免疫", "精神", "心理", "吸烟", "饮酒", "酗酒", "肥胖", "年龄", "老化", "衰老",
                   "高龄", "不良", "过度", "劳累", "压力", "家族", "体质", "感染", "营养", "药物", "生活", "饮食")
GENERIC_SYMPTOMS = ("热", "乏力", "恶心", "呕吐", "头晕", "头痛", "食欲", "纳差", "消瘦", "体重", "疲劳", "疲倦",
                     "不适", "水肿", "咳", "腹泻", "腹痛", "瘙痒", "皮疹", "贫血", "呼吸困难", "气促", "气短", "心悸",
                     "意识", "休克", "疼痛", "精神", "睡眠", "失眠", "无力", "出汗", "多汗", "烦躁", "哭闹", "黄疸")


_GENERIC = {GENERIC_CAUSES: re.compile("|".join(GENERIC_CAUSES)),
            GENERIC_SYMPTOMS: re.compile("|".join(GENERIC_SYMPTOMS))}


def specific(items, generic) -> list[str]:
    pattern = _GENERIC[generic]
    return [x for x in items if not pattern.search(x)]


def pick(rng: random.Random, phrasings: list[str], **values) -> str:
    return rng.choice(phrasings).format(**values)


def distinct(rng: random.Random, pool: list[str], k: int, avoid: list[str]) -> list[str] | None:
    """`k` phrases from `pool` (shuffled), none overlapping each other or `avoid`; None when too few."""
    pool = sorted(set(pool))
    rng.shuffle(pool)
    chosen: list[str] = []
    for item in pool:
        if not any_overlap([item], avoid) and not any_overlap([item], chosen):
            chosen.append(item)
            if len(chosen) == k:
                return chosen
    return None


# Age and sex for patient vignettes, from obvious keywords of the high-risk groups.
def _person_from_group(group: str, rng: random.Random) -> str | None:
    if "新生儿" in group or "早产儿" in group:
        return f"患儿{rng.choice('男女')}，出生{rng.randint(2, 20)}天"
    if "婴幼儿" in group or "婴儿" in group:
        return f"患儿{rng.choice('男女')}，{rng.randint(1, 2)}岁"
    if "儿童" in group or "小儿" in group or "学龄" in group:
        return f"患儿{rng.choice('男女')}，{rng.randint(4, 10)}岁"
    if "青少年" in group:
        return f"患者{rng.choice('男女')}，{rng.randint(13, 17)}岁"
    if "孕妇" in group or "妊娠" in group or "孕期" in group:
        return f"患者女，{rng.randint(24, 34)}岁，妊娠期"
    if "中老年" in group:
        ages = (50, 65)
    elif "老年" in group or "老人" in group:
        ages = (65, 80)
    elif "育龄" in group or "年轻" in group or "青年" in group:
        ages = (22, 36)
    elif "绝经" in group:
        ages = (52, 65)
    else:
        ages = None
    sex = "女" if ("女性" in group or "妇女" in group or "绝经" in group) else "男" if "男性" in group else None
    if ages is None and sex is None:
        return None
    sex = sex or rng.choice("男女")
    ages = ages or (30, 50)
    return f"患者{sex}，{rng.randint(*ages)}岁"


def person(d: dict, rng: random.Random) -> str:
    number, _ = chapter_parts(d["icd10_chapter"])
    if number == "XVI" or "新生儿" in d["name"]:
        return f"患儿{rng.choice('男女')}，出生{rng.randint(2, 20)}天"
    if number == "XV":
        if "产后" in d["name"] or "产褥" in d["name"]:
            return f"患者女，{rng.randint(24, 36)}岁，产后{rng.randint(2, 20)}天"
        return f"患者女，{rng.randint(24, 36)}岁，妊娠期"
    if "小儿" in d["name"] or "儿童" in d["name"]:
        return f"患儿{rng.choice('男女')}，{rng.randint(4, 10)}岁"
    for group in d.get("high_risk_groups", []):
        person = _person_from_group(group, rng)
        if person:
            return person
    return f"患者{rng.choice('男女')}，{rng.randint(25, 55)}岁"
