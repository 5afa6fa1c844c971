"""Golden outputs of the online plane's per-batch step: PatientProcessor.process on a stored corpus
of canonical messages must give, byte for byte, the outputs it gave when the fixture was made.

The corpus (tests/fixtures/processor/corpus.jsonl.gz) is the replay of the 8-patient clinosim cohort
(seed 7) with its faults (redeliveries, cross-source twins, amendments, retractions, late rows,
context changes, lactates reported preliminary then final: one under an alert that its final amends),
parsed by the ingest and cut into canonical messages as benchmarks/processor.py cuts them; then three
made-up patients for what the cohort lacks (synthetic_messages: alert corrections, amended and
entered-in-error, a resolution by discharge, the rule path, an alert on a preliminary result made
final); then two messages the worker must dead-letter (added by load_corpus). It is stored, not
generated, so the test depends on neither clinosim nor the ingest parsers. Each variant runs it
through a fresh processor with the shipped model as `current` and as `candidate` (shadow scores) and
compares a sha256 per output kind (every record, in order) and of the final patient records (their
table bytes) with tests/fixtures/processor/golden.json.

This is what proves a speed-up of the worker changed nothing. When outputs are meant to change (the
shipped model is retrained, the feature list or an output format changes), regenerate after checking
the reason:

    .venv/bin/python -m tests.streams.test_processor_golden             # golden.json from the corpus
    .venv/bin/python -m tests.streams.test_processor_golden --corpus    # the corpus too (needs clinosim)
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import orjson
import pytest

from streams.patient_agent import CanonicalMessage, Outputs, PatientProcessor, PatientRecord
from streams.scoring import Scorer
from wardwatch.demo import seed_models
from wardwatch.settings import Settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "processor"
CORPUS = FIXTURES / "corpus.jsonl.gz"
GOLDEN = FIXTURES / "golden.json"

# (settings overrides, canonical messages per worker batch, whether the table round-trips through bytes)
VARIANTS: dict[str, tuple[dict, int, bool]] = {
    # what a worker under full load sees: the whole corpus in one batch, its parsed cache as the table
    "default": ({}, 2000, False),
    # every vitals set scored, a lower alert line (more alerts, more corrections of them), small
    # batches and the table reloaded from its changelog bytes between batches
    "dense": ({"scoring_min_interval_s": 0, "alert_threshold": 0.3, "alert_reset": 0.2}, 5, True),
}
RECORD_KINDS = ("late", "features", "scores", "alerts", "shadow")  # Outputs lists of (key, value, headers)
KINDS = (*RECORD_KINDS, "rejected", "records", "counters")


def load_corpus() -> list[CanonicalMessage]:
    rows = [orjson.loads(line) for line in gzip.decompress(CORPUS.read_bytes()).splitlines()]
    messages = [CanonicalMessage(p, offset, value.encode(), None, key.encode()) for p, offset, key, value in rows]
    # two the worker must dead-letter (offsets after the corpus's, on partition 0)
    last = max(m.offset for m in messages if m.partition == 0)
    two_patients = orjson.loads(messages[0].value)[:1] + [{**orjson.loads(messages[0].value)[0], "patient_id": "x"}]
    return messages + [CanonicalMessage(0, last + 1, b"[{not json", None, b"x"),
                       CanonicalMessage(0, last + 2, orjson.dumps(two_patients), None, b"x")]


def run_variant(name: str, model_root: Path) -> dict[str, dict]:
    overrides, batch_messages, through_bytes = VARIANTS[name]
    model_dir = model_root / name
    seed_models(model_dir)
    (model_dir / "candidate").write_text((model_dir / "current").read_text())  # shadow-score with the same model
    settings = Settings(model_dir=model_dir, **overrides)
    processor = PatientProcessor(settings, Scorer(model_dir, settings))
    messages = load_corpus()
    table: dict[str, PatientRecord | bytes] = {}

    def load(patient: str) -> PatientRecord | None:
        rec = table.get(patient)
        return PatientRecord.from_bytes(rec) if isinstance(rec, bytes) else rec

    outputs = Outputs()
    for start in range(0, len(messages), batch_messages):
        records, out = processor.process(messages[start:start + batch_messages], load)
        table.update({p: r.to_bytes() if through_bytes else r for p, r in records.items()})
        for kind in (*RECORD_KINDS, "rejected"):
            getattr(outputs, kind).extend(getattr(out, kind))

    lines: dict[str, list[bytes]] = {
        kind: [orjson.dumps([key.decode(), value.decode(), [[h, v.decode()] for h, v in headers]])
               for key, value, headers in getattr(outputs, kind)]
        for kind in RECORD_KINDS}
    lines["rejected"] = [orjson.dumps([m.partition, m.offset, r.reason.value, r.detail, r.exception])
                         for m, r in outputs.rejected]
    lines["records"] = [patient.encode() + b" " + (rec if isinstance(rec, bytes) else rec.to_bytes())
                        for patient, rec in sorted(table.items())]
    lines["counters"] = [orjson.dumps(dict(sorted(processor.counters.items())))]
    return {kind: {"count": len(lines[kind]), "sha256": hashlib.sha256(b"\n".join(lines[kind])).hexdigest()}
            for kind in KINDS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_processor_outputs_are_byte_for_byte_the_golden_ones(variant, tmp_path):
    golden = orjson.loads(GOLDEN.read_bytes())[variant]
    got = run_variant(variant, tmp_path)
    # the corpus exercises every output kind, or the comparison would prove little
    assert all(golden[kind]["count"] > 0 for kind in KINDS), golden
    differing = [kind for kind in KINDS if got[kind] != golden[kind]]
    assert not differing, (f"{variant}: outputs differ from the golden ones in {differing} "
                           f"(got {[got[k] for k in differing]}, golden {[golden[k] for k in differing]}); "
                           "if that is intended, regenerate: see this module's docstring")


def synthetic_messages(partition: int, first_offset: int) -> list[CanonicalMessage]:
    """G-0001: admitted, alerted, its alert amended then withdrawn by corrections of its basis, a new
    episode, discharged while alerting. G-0002: vitals without every NEWS2 input (the rule path).
    G-0003: an alert resting on a preliminary lactate (flagged), amended when the lactate is final."""
    from schemas import codes
    from schemas.canonical import CanonicalEvent, Source, Status, encode_batch

    t0, minute = 1_718_000_000_000, 60_000
    high = {codes.RESP_RATE: 26, codes.SPO2: 90, codes.O2_FLOW: 2.0, codes.SYSTOLIC_BP: 88, codes.HEART_RATE: 135,
            codes.CONSCIOUSNESS: 3, codes.TEMPERATURE: 39.5}
    normal = {codes.RESP_RATE: 16, codes.SPO2: 97, codes.O2_FLOW: 0.0, codes.SYSTOLIC_BP: 125, codes.HEART_RATE: 75,
              codes.CONSCIOUSNESS: 0, codes.TEMPERATURE: 37.0}

    def row(patient, t, row_id, values, version=1, status=Status.FINAL):
        return [CanonicalEvent(patient, code, None if status.retracts else float(v), None, t, t, status, Source.CDC,
                               f"cdc:vital_signs:{row_id}:{code}", version, f"ENC-{patient}")
                for code, v in values.items()]

    def context(patient, code, t, text=None):
        return CanonicalEvent(patient, code, None, None, t, t, Status.FINAL, Source.CDC, f"cdc:encounters:{code}:{t}",
                              1, f"ENC-{patient}", codes.CONTEXT, text)

    def lactate(patient, t, status, version):
        return [CanonicalEvent(patient, codes.LACTATE, 4.2, "mmol/L", t, t, status, Source.FHIR,
                               f"fhir:Observation/lac-{patient}:{codes.LACTATE}", version, f"ENC-{patient}")]

    g1, g2, g3 = "G-0001", "G-0002", "G-0003"
    batches = [
        [context(g1, codes.ADMISSION, t0, "inpatient"), context(g1, codes.LOCATION, t0, "4E")],
        row(g1, t0 + 10 * minute, 1, high),
        row(g1, t0 + 30 * minute, 2, high),
        row(g1, t0 + 30 * minute, 2, {codes.HEART_RATE: 140}, version=2, status=Status.AMENDED),
        row(g1, t0 + 10 * minute, 1, high, version=2, status=Status.ENTERED_IN_ERROR)
        + row(g1, t0 + 30 * minute, 2, normal, version=3, status=Status.AMENDED),
        row(g1, t0 + 120 * minute, 3, high),
        row(g1, t0 + 130 * minute, 4, high),
        [context(g1, codes.DISCHARGE, t0 + 180 * minute)],
        row(g2, t0, 5, {codes.HEART_RATE: 120, codes.RESP_RATE: 25}),
        row(g2, t0 + 20 * minute, 6, {codes.HEART_RATE: 125, codes.RESP_RATE: 26, codes.SPO2: 91}),
        lactate(g3, t0 - 30 * minute, Status.PRELIMINARY, 1),
        row(g3, t0, 7, high),
        lactate(g3, t0 - 30 * minute, Status.FINAL, 2),
    ]
    return [CanonicalMessage(partition, first_offset + i, encode_batch(events), None, events[0].patient_id.encode())
            for i, events in enumerate(batches)]


def make_corpus() -> None:
    """The corpus from the cached clinosim cohort (benchmarks/processor.py's cutting), then
    synthetic_messages on partition 0."""
    import tempfile

    from benchmarks.processor import bench_settings, canonical_messages
    from streams.replay import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(Path(tmp) / "models")
        cohort = generate_cohort(Path("data/cache").resolve(), patients=8, seed=7)
        messages = canonical_messages(cohort, settings, seed=7, faults=True, raw_per_poll=8)
    messages += synthetic_messages(0, max(m.offset for m in messages if m.partition == 0) + 1)
    rows = [orjson.dumps([m.partition, m.offset, m.key.decode(), m.value.decode()]) for m in messages]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    CORPUS.write_bytes(gzip.compress(b"\n".join(rows), compresslevel=9, mtime=0))


def make_golden() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        golden = {name: run_variant(name, Path(tmp)) for name in sorted(VARIANTS)}
    GOLDEN.write_bytes(orjson.dumps(golden, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(golden, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    if "--corpus" in sys.argv[1:]:
        make_corpus()
    make_golden()
