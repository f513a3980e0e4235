"""Draws data/devq/devq.jsonl: 300 real patients' questions from Toyhom's Chinese medical dialogue data (MIT), the
internal-medicine sample file, for development only (reading what goes wrong, choosing kinds of training data).

    python data/devq/draw.py /work/.mirror/Toyhom+Chinese-medical-dialogue-data/repo > data/devq/devq.jsonl

The argument is a git directory of https://github.com/Toyhom/Chinese-medical-dialogue-data at COMMIT. Questions of
15-600 characters with an answer of 10+, exact duplicates dropped, `random.Random(2028)`, at most 60 per department.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys

REPO = "Toyhom/Chinese-medical-dialogue-data"
COMMIT = "26724a4357fcd142f0cab81188cacf1a2dd8a827"
PATH = "样例_内科5000-6000.csv"
LICENCE = "MIT"
COUNT, PER_DEPARTMENT = 300, 60


def main(git_dir: str) -> None:
    raw = subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{PATH}"], check=True,
                         capture_output=True).stdout.decode("gb18030")
    rows, seen = [], set()
    for number, row in enumerate(csv.DictReader(io.StringIO(raw)), start=2):  # line 1 is the header
        question, answer = (row.get("ask") or "").strip(), (row.get("answer") or "").strip()
        if 15 <= len(question) <= 600 and len(answer) >= 10 and question not in seen:
            seen.add(question)
            rows.append((number, row["department"].strip(), row["title"].strip(), question, answer))
    random.Random(2028).shuffle(rows)
    taken, per = [], {}
    for number, department, title, question, answer in rows:
        if per.get(department, 0) < PER_DEPARTMENT:
            per[department] = per.get(department, 0) + 1
            taken.append({"instruction": question, "input": "", "output": answer, "title": title,
                          "department": department, "id": f"toyhom-im-{number}", "source": REPO, "path": PATH,
                          "line": number, "commit": COMMIT, "licence": LICENCE})
        if len(taken) == COUNT:
            break
    for record in taken:
        print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
