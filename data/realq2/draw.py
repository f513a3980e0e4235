"""How data/realq2/realq2.jsonl was drawn (the labels were then added by hand):
python data/realq2/draw.py PATH/TO/Zhongjing  (a clone of SupritYoung/Zhongjing at the commit below)."""

import json
import random
import re
import subprocess
import sys

COMMIT = "a105934245c265b84f77dbb070b568e2a79688b4"
PATIENT = re.compile(r"我|俺|本人|孩子|宝宝|儿子|女儿|老公|老婆|爸|妈|爷爷|奶奶|外公|外婆")


def main(repo: str) -> None:
    raw = subprocess.run(["git", "-C", repo, "show", f"{COMMIT}:data/huatuo26M_test.json"], capture_output=True,
                         check=True).stdout
    first = [json.loads(line) for line in open("data/realq/realq.jsonl", encoding="utf-8")]
    used, used_questions = {r["id"] for r in first}, {r["instruction"] for r in first}
    seen, pool = set(), []
    for i, item in enumerate(json.loads(raw)):
        question, answer = "".join(item["instruction"]).strip(), "".join(item["output"]).strip()
        if f"huatuo26m-test-{i}" in used or question in used_questions or question in seen \
                or not 15 <= len(question) <= 600 or len(answer) < 10:
            continue
        seen.add(question)
        pool.append((i, question, answer))
    random.Random(2027).shuffle(pool)
    pool.sort(key=lambda p: 0 if PATIENT.search(p[1]) or len(p[1]) >= 40 else 1)
    with open("data/realq2/realq2.jsonl", "w", encoding="utf-8") as out:
        for i, question, answer in pool[:200]:
            out.write(json.dumps({"instruction": question, "input": "", "output": answer, "id": f"huatuo26m-test-{i}",
                                  "source": "SupritYoung/Zhongjing", "path": "data/huatuo26M_test.json",
                                  "commit": COMMIT, "licence": "Apache-2.0"}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
