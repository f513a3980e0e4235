"""The hand-written phrasing tables (`phrasing.yaml`, our own wording): for each attribute many questions in several
voices (textbook, exam, a patient's or a relative's own words) and several answer wordings; questions asking two
attributes at once; a patient's symptoms; "要不要紧"; drug → disease; diseases we know nothing reliable about;
emergencies, crises and requests for harm with their safe answers; multiple-choice stems and explanations."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

PHRASING_FILE = Path(__file__).with_name("phrasing.yaml")
# The three triage registers besides emergencies (triage.yaml, hand-written): worrying-but-not-urgent questions
# (`soon`: see a doctor within days, and go at once if …), everyday questions in patients' own words (`routine`: a
# plain answer), and narrative openings for the knowledge patterns (`frames`).
TRIAGE_FILE = Path(__file__).with_name("triage.yaml")


@lru_cache(maxsize=1)
def phrasing() -> dict:
    tables = yaml.safe_load(PHRASING_FILE.read_text(encoding="utf-8"))
    return {**tables, **yaml.safe_load(TRIAGE_FILE.read_text(encoding="utf-8"))}
