"""Stream a large JSONL file through `medlora.data.iter_records` and report peak memory against file size.

    python bench/large_jsonl.py                 # ~1 GB in a temporary folder, removed afterwards
    python bench/large_jsonl.py --size-mb 200   # smaller, for a quick look

The file holds Chinese medical-style records of varied length (our own text). Peak RSS comes from
`resource.getrusage` (the process's high-water mark); what matters is that it stays flat as the file grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

QUESTIONS = ["感冒的常见症状是什么？", "高血压患者日常饮食需要注意什么？", "糖尿病的典型症状有哪些？",
             "哮喘发作时首选什么药物？", "缺铁性贫血常用什么药？", "痛风急性发作常用什么药？"]
ANSWERS = ["鼻塞、流涕、咽痛，多休息、多饮水。", "低盐低脂饮食，控制体重，规律服药并监测血压。",
           "多饮、多尿、多食、体重下降。", "首选短效β2受体激动剂吸入，如沙丁胺醇。", "口服铁剂，如硫酸亚铁。",
           "秋水仙碱或非甾体抗炎药，急性期避免降尿酸药物加量。"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def write_jsonl(path: Path, size_bytes: int) -> int:
    """Write records until the file reaches `size_bytes`; returns how many were written."""
    parts = []  # a pool of distinct record shapes (100 bytes to ~3 kB), split around the case number
    for i in range(600):
        record = {"instruction": f"{QUESTIONS[i % 6]}（病例 #）", "input": "患者为成人。" * (i % 4),
                  "output": ANSWERS[i % 6] * (1 + (i * 7) % 25)}
        parts.append(tuple(json.dumps(record, ensure_ascii=False).split("#", 1)))
    written = count = 0
    with path.open("w", encoding="utf-8", buffering=1 << 20) as handle:
        while written < size_bytes:
            chunk = "".join(f"{head}{count + k}{tail}\n" for k, (head, tail) in enumerate(parts))
            handle.write(chunk)
            written += len(chunk.encode("utf-8"))
            count += len(parts)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size to generate (default: 1024 MB)")
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temporary folder)")
    args = parser.parse_args(argv)

    from medlora.data import iter_records

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="medlora-large-") as folder:
        path = Path(folder) / "large.jsonl"
        started = time.perf_counter()
        written = write_jsonl(path, args.size_mb * 1024 * 1024)
        write_s = time.perf_counter() - started
        size_mb = path.stat().st_size / 1024 / 1024
        before = peak_rss_mb()
        started = time.perf_counter()
        count = chars = 0
        for record in iter_records(path):
            count += 1
            chars += len(record["output"])
        seconds = time.perf_counter() - started
        after = peak_rss_mb()
        os.sync()
    assert count == written, f"{written} records written, {count} read"
    rows = [("file size", f"{size_mb:,.0f} MB ({count:,} records; written in {write_s:.0f} s)"),
            ("streamed through iter_records", f"{seconds:.1f} s = {size_mb / seconds:.0f} MB/s, "
                                              f"{count / seconds:,.0f} records/s"),
            ("peak RSS before streaming", f"{before:,.0f} MB"),
            ("peak RSS after streaming", f"{after:,.0f} MB (+{after - before:,.0f} MB)"),
            ("peak RSS / file size", f"{after / size_mb:.3f}")]
    print("| large JSONL | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
