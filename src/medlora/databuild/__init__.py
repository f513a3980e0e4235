"""Build instruction records from structured medical knowledge, the way Huatuo (BenTsao) built its data from a
knowledge graph. `medlora data build` is the command.

- kb.py: the curated knowledge base (`src/medlora/kb/`) and the sources (kb, cmekg, both);
- phrasing.py + phrasing.yaml: the hand-written question and answer wordings;
- index.py: look-ups over the diseases (distractors, partners) and small helpers;
- patterns.py: knowledge patterns; mcq.py: multiple choice; safety.py: emergencies, crises, harm, unknown diseases;
- assemble.py: splits, training variants and drills, writing the files.
"""

from medlora.databuild.assemble import (ALL_PATTERNS, SPLITS, TRAIN_ONLY_PATTERNS, build_dataset, build_records,
                                        build_tagged)
from medlora.kb import CHAPTERS, KB_DIR, SOURCES, load_knowledge_base, load_sources
from medlora.databuild.mcq import MCQ_PATTERNS

__all__ = ["ALL_PATTERNS", "CHAPTERS", "KB_DIR", "MCQ_PATTERNS", "SOURCES", "SPLITS", "TRAIN_ONLY_PATTERNS",
           "build_dataset", "build_records", "build_tagged", "load_knowledge_base", "load_sources"]
