"""The evaluator seam: a serial evaluator pulls candidates exactly as a pool of ``in_flight``
workers would, and a fitness worker turns every outcome of scoring a genome (a score, a cut, an
error) into a journal record instead of a crash."""

import pytest

from eep.config import parse_config
from eep.errors import EepError
from eep.evaluator import Candidate, FitnessWorker, SerialEvaluator
from eep.genome import Genome
from eep.journal import Evaluation
from tests.conftest import toy_config_dict

KEEP = Genome.from_keep(8, 2, {i: [0, 2, 5, 7] for i in range(4)})


class Echo:
    """A worker that scores candidate i as i, recording when it is called."""

    def __init__(self, events):
        self.events = events

    def __call__(self, candidate):
        self.events.append(f"score {candidate.id}")
        return Evaluation(candidate.id, candidate.genome, float(candidate.id), {}, 0.0, "echo")


@pytest.mark.parametrize("in_flight", [1, 3])
def test_serial_evaluator_pulls_in_flight_ahead_then_one_per_result(in_flight):
    events = []

    def candidates():
        for i in range(5):
            events.append(f"bred {i}")
            yield Candidate(i, KEEP)

    results = []
    for evaluation in SerialEvaluator(Echo(events), in_flight).imap(candidates()):
        events.append(f"folded {evaluation.id}")
        results.append(evaluation.id)
    assert results == [0, 1, 2, 3, 4]  # candidate order
    # the first in_flight candidates are bred before any result; each later one only after the
    # previous result was folded into the archive (what makes a serial run equal a parallel one)
    assert events[:in_flight] == [f"bred {i}" for i in range(in_flight)]
    for i in range(in_flight, 5):
        assert events.index(f"bred {i}") > events.index(f"folded {i - in_flight}")


@pytest.fixture(scope="module")
def worker():
    data = toy_config_dict()
    data["fitness"]["batch_size"] = 6  # one chunk per task: a cut can come before the end
    return FitnessWorker(parse_config(data))


def test_a_candidate_is_scored_cut_or_failed_never_crashing(worker):
    scored = worker(Candidate(0, KEEP))
    assert scored.status == "ok" and scored.scores == worker.scores(KEEP)
    assert scored.fitness == worker.fitness(scored.scores)

    cut = worker(Candidate(1, KEEP, bar=101.0))  # above any fitness: stopped after a chunk
    assert cut.status == "cut" and cut.fitness is None
    assert cut.cut >= scored.fitness  # an upper bound of what it would have scored

    wrong = Genome.from_keep(8, 2, {i: [0, 1] for i in range(6)})  # layers the toy does not have
    failed = worker(Candidate(2, wrong))
    assert failed.status == "failed" and "EepError" in failed.error


def test_latency_is_measured_where_the_search_asks_for_it_and_journaled(worker, tmp_path):
    """A worker of a ``[fitness, latency]`` search times each candidate (the fastest of forward
    passes of one fixed batch, with the genome applied, as a share of the full model's time taken
    beside it) and the record keeps it through the journal; a worker of any other search measures
    nothing."""
    assert worker(Candidate(0, KEEP)).latency is None
    data = toy_config_dict(latency_repeats=2)
    data["search"]["objectives"] = ["fitness", "latency"]
    del data["search_space"]["keep"]
    timed = FitnessWorker(parse_config(data))
    assert timed.latency_batch()["input_ids"].shape[0] == 24  # 4 tasks x 6 (< batch_size)
    record = timed(Candidate(0, KEEP))
    assert record.ok and 0 < record.latency < 2  # a share of the full model's time
    assert Evaluation.from_dict(record.to_dict()).latency == record.latency
    assert "latency" not in worker(Candidate(1, KEEP)).to_dict()
    assert SerialEvaluator(timed).milliseconds(None) > 0  # the full model's, shown in ms
    assert 0.5 < SerialEvaluator(timed).latency(None) < 2  # the full model against itself
    failed = timed(Candidate(2, Genome.from_keep(8, 2, {i: [0, 1] for i in range(6)})))
    assert failed.status == "failed" and failed.latency is None


def test_a_genome_on_a_model_it_cannot_apply_to_is_a_clear_error(tmp_path):
    """eep's custom-form exports are scored as they are; a genome on them is a one-line error
    (it used to be a NameError)."""
    from eep.export import export_genome

    uneven = Genome.from_keep(8, 2, {0: [0, 2, 5], 1: [1, 2, 3, 4], 2: [0, 3], 3: [1, 4, 6]})
    export_genome(parse_config(toy_config_dict()).model, uneven, tmp_path / "x", log=lambda m: None)
    data = toy_config_dict()
    data["model"]["path"] = str(tmp_path / "x")
    custom = FitnessWorker(parse_config(data))
    assert custom.adapter is None and set(custom.scores(None)) == {
        "copy",
        "reverse",
        "shift",
        "lookup",
    }
    with pytest.raises(EepError, match="cannot apply a genome to .* give the source model"):
        custom.scores(KEEP)


@pytest.fixture(scope="module")
def validating():
    data = toy_config_dict()
    data["fitness"]["batch_size"] = 4  # several chunks per task: a cut can come early
    for task in data["fitness"]["tasks"]:
        task["validation_size"] = 8
    return FitnessWorker(parse_config(data))


def test_validation_scores_stop_once_they_cannot_reach_the_bar(validating):
    """What a validation pick races its candidates with: the full scores when they can reach the
    bar (reaching it exactly included), None once they cannot (checked after each chunk but the
    last)."""
    from eep.evolution import validation_fitness

    full = validating.scores(KEEP, "validation")
    fitness = validation_fitness(validating.config, full)
    assert SerialEvaluator(validating).heldout(KEEP, "validation") == full
    assert fitness < 90  # a task misses several examples, so a bar of 90 is out of reach early
    assert validating.reaching(KEEP, "validation", cut_below=fitness) == full
    assert validating.reaching(KEEP, "validation", cut_below=90.0) is None
    assert SerialEvaluator(validating).heldout(KEEP, "validation", cut_below=90.0) is None


def test_a_raced_validation_pick_is_the_pick_of_scoring_every_candidate(validating):
    """``select`` validates the candidates in rank order with the best so far as the bar; the ones
    cut short could not have won, so it picks what scoring all of them in full picks."""
    import random

    from eep.evolution import _validator, validation_fitness
    from eep.loop import select

    rng = random.Random(1)
    archive = [
        Evaluation(
            i, Genome.from_keep(8, 2, {j: rng.sample(range(8), 2) for j in range(4)}), 50.0 - i
        )
        for i in range(10)
    ]
    calls = []

    class Recording(SerialEvaluator):
        def heldout(self, genome, split="test", cut_below=None, order=()):
            calls.append(cut_below)
            return super().heldout(genome, split, cut_below, order)

    chosen, tried = select(archive, _validator(validating.config, Recording(validating), {}), 10)
    full = {
        e.id: validation_fitness(validating.config, validating.scores(e.genome, "validation"))
        for e in archive
    }
    assert chosen.id == max(archive, key=lambda e: (full[e.id], -e.id)).id
    assert tried[chosen.id] == full[chosen.id]
    assert calls[0] is None and all(bar is not None for bar in calls[1:])
    cut = [i for i, v in tried.items() if v is None]
    assert cut  # the race did cut some short
    assert all(v == full[i] for i, v in tried.items() if v is not None)


def test_a_genome_without_validation_examples_is_scored_once():
    """No task validates: the validator's answer, None, is remembered like a score, not taken for
    "not scored yet"."""
    from eep.evolution import _validator

    calls = []

    class NoValidation:
        def heldout(self, genome, split="test", cut_below=None, order=()):
            calls.append(genome.key)
            return {}  # no task has validation examples

    config = parse_config(toy_config_dict())
    validate = _validator(config, NoValidation(), {})
    assert validate(KEEP) is None and validate(KEEP) is None and validate(KEEP, 50.0) is None
    assert calls == [KEEP.key]
