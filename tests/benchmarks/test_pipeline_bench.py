import math

import orjson
import pytest

from benchmarks.pipeline import ScoreArrival, combine, id_pattern, pipeline_figures, repeated, run_bench, with_suffix
from streams.replay import RawMessage

MRN, PATIENT_RESOURCE = "C0-0001", "pt-324a66a0db81"


def cdc_insert(row_id: int, mrn: str) -> RawMessage:
    key = orjson.dumps({"payload": {"id": row_id, "patient_id": mrn}})
    value = orjson.dumps({"payload": {"after": {"id": row_id, "patient_id": mrn, "encounter_id": f"ENC-{mrn}-6324",
                                                "heart_rate": 91}, "op": "c"}})
    return RawMessage("cdc", "vital_signs", key, value)


def lab_notification(mrn: str) -> RawMessage:
    obs = {"resourceType": "Observation", "id": "lab-a69583ef8a26",
           "subject": {"reference": f"Patient/{PATIENT_RESOURCE}", "identifier": {"value": mrn}},
           "valueQuantity": {"value": 2.2}}
    return RawMessage("fhir", None, mrn.encode(), orjson.dumps({"resourceType": "Bundle", "entry": [{"resource": obs}]}))


# --- pure helpers ---------------------------------------------------------------------------------


def test_renaming_gives_new_patients_with_the_same_clinical_content():
    pattern = id_pattern([MRN, PATIENT_RESOURCE])
    cdc, lab = with_suffix([cdc_insert(7, MRN), lab_notification(MRN)], pattern, "-r3")

    assert orjson.loads(cdc.key)["payload"] == {"id": 7, "patient_id": "C0-0001-r3"}
    after = orjson.loads(cdc.value)["payload"]["after"]
    assert after == {"id": 7, "patient_id": "C0-0001-r3", "encounter_id": "ENC-C0-0001-r3-6324", "heart_rate": 91}
    assert lab.key == b"C0-0001-r3"
    obs = orjson.loads(lab.value)["entry"][0]["resource"]
    assert obs["subject"] == {"reference": "Patient/pt-324a66a0db81-r3", "identifier": {"value": "C0-0001-r3"}}
    assert obs["valueQuantity"] == {"value": 2.2} and obs["id"] == "lab-a69583ef8a26"


def test_renaming_leaves_longer_ids_and_tombstones_alone():
    pattern = id_pattern([MRN])
    other, tombstone = with_suffix([cdc_insert(8, "C0-00012"), RawMessage("cdc", "vital_signs", b"k", None)],
                                   pattern, "-r1")
    assert orjson.loads(other.key)["payload"]["patient_id"] == "C0-00012"
    assert tombstone.value is None


def test_each_repetition_has_its_own_patients():
    messages = [cdc_insert(1, MRN), lab_notification(MRN), cdc_insert(2, "C1-0001")]
    out = repeated(messages, id_pattern([MRN, "C1-0001", PATIENT_RESOURCE]), 3)

    assert len(out) == 9
    keys = [m.key for m in out]
    assert len(set(keys)) == 9
    assert [m.kind for m in out] == [m.kind for m in messages] * 3
    assert {orjson.loads(m.key)["payload"]["patient_id"] for m in out if m.kind == "cdc"} == {
        f"{p}-r{r}" for p in (MRN, "C1-0001") for r in range(3)}


def test_figures_span_from_the_first_produce_to_the_last_score():
    ms = 1_000_000
    arrivals = [ScoreArrival(1_000 * ms, 990 * ms, "a", "rule"), ScoreArrival(1_500 * ms, 1_400 * ms, "b", "rule"),
                ScoreArrival(3_000 * ms, 2_970 * ms, "a", "model"), ScoreArrival(2_000 * ms, None, "c", "rule")]
    figures = pipeline_figures(n_events=400, first_produced_ns=0, arrivals=arrivals)

    assert figures["pipeline_events_per_s"] == pytest.approx(400 / 3.0)
    assert figures["latency_ms_p50"] == pytest.approx(30.0)  # of 10, 100, 30 ms; the headerless one is left out
    assert figures["latency_ms_max"] == pytest.approx(100.0)
    assert figures["n_scores"] == 4 and figures["n_scores_without_produced_ns"] == 1
    assert figures["n_patients"] == 3
    assert figures["scoring_paths"] == {"rule": 3, "model": 1}


def test_no_scores_means_no_throughput():
    figures = pipeline_figures(n_events=10, first_produced_ns=0, arrivals=[])
    assert figures["pipeline_events_per_s"] == 0.0 and math.isnan(figures["latency_ms_p99"])


def test_ratio_is_pipeline_over_baseline():
    baseline = {"baseline_events_per_s": 2000.0, "baseline_latency_ms_p50": 5.0, "baseline_latency_ms_p99": 9.0,
                "n": 10}
    out = combine({"pipeline_events_per_s": 500.0}, baseline, {"cpu_count": 2})
    assert out["ratio"] == 0.25 and out["baseline_n"] == 10 and out["cpu_count"] == 2


# --- the whole run --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_small_run_measures_both_sides(tmp_path):
    result = run_bench(patients=2, repeat=1, data_dir=tmp_path / "bench", cache_dir=tmp_path / "cache",
                       quiet_s=3.0, timeout_s=110)

    for key in ("pipeline_events_per_s", "baseline_events_per_s", "ratio", "latency_ms_p50", "latency_ms_p99",
                "latency_ms_max", "baseline_latency_ms_p50", "baseline_latency_ms_p99"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["n_events"] > 0 and result["baseline_n"] == result["n_events"]
    assert result["n_scores"] > 0 and result["n_scores_without_produced_ns"] == 0
    assert result["n_patients"] == 2  # every replayed patient was scored; the warm-up patient is not counted
    assert result["latency_ms_p99"] >= result["latency_ms_p50"]
    assert result["cpu_count"] and result["python_version"] and result["timestamp"]
