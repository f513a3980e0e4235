"""Fact-level scores: the knowledge base's items for the disease and attribute a record asks about, against the
terms its answer names (docs/evaluation.md, "Fact-level scores")."""

from __future__ import annotations

from medlora.vocab import ATTRIBUTES, offered_letters, question_text


def fact_scores(row: dict, index=None) -> dict:
    """{'fact_recall', 'fact_precision'} for a row about one knowledge-base disease asking one attribute (its
    `disease`/`attribute` fields, else found in the question); {} otherwise, and no precision when the answer
    names no term of that attribute. Items and terms that the question itself names are left out (no credit
    for echoing the question)."""
    from medlora.knowledge import KnowledgeIndex  # here: the built-in index loads on first use

    index = index or KnowledgeIndex.builtin()
    question = question_text(row)
    if row.get("kind") in ("mcq", "emergency", "out_of_kb") or offered_letters(row):
        return {}
    disease, attribute = row.get("disease"), row.get("attribute")
    if "disease" not in row:
        linked = index.link(question)
        disease = linked[0] if len(linked) == 1 else None
    if "attribute" not in row:
        attribute = index.asked_attribute(question)
    if disease not in index.diseases or attribute not in ATTRIBUTES:
        return {}
    output, known = row.get("output") or "", index.items(disease, attribute)
    items = [item for item in known if not index.names(question, item)]
    if not items:
        return {}
    scores = {"fact_recall": sum(index.names(output, item) for item in items) / len(items)}
    terms = {t for t in index.terms(output, attribute) if not index.names(question, t)}
    if terms:
        held = [t for t in terms if any(t == item or index.names(t, item) for item in known)]
        scores["fact_precision"] = len(held) / len(terms)
    return scores
