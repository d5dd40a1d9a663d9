"""Generation metrics with every reference per input: BLEU, chrF and TER (sacrebleu) and ROUGE-L."""

from __future__ import annotations


def generation_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU, chrF, TER (sacrebleu defaults) and mean best-reference ROUGE-L F (beta 1.2), as percentages."""
    import sacrebleu

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("need one reference list per hypothesis, and at least one hypothesis")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    most = max(len(refs) for refs in references)
    # sacrebleu takes reference streams; a None marks a missing reference of an input with fewer of them
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
        "ter": sacrebleu.corpus_ter(hypotheses, streams).score,
        "rouge_l": 100 * sum(rouge_l(h, refs) for h, refs in zip(hypotheses, references)) / len(hypotheses),
    }


def rouge_l(hypothesis: str, references: list[str], beta: float = 1.2) -> float:
    """Sentence ROUGE-L F-measure on lower-cased whitespace tokens, the best over the references."""
    candidate = hypothesis.lower().split()
    best = 0.0
    for reference in references:
        target = reference.lower().split()
        common = _lcs(candidate, target)
        if common == 0:
            continue
        precision, recall = common / len(candidate), common / len(target)
        best = max(best, (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return best


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]
