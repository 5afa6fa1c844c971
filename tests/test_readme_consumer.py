"""The README's alert consumer ("Consuming alerts and risk"), run as written on the worker's own alert
records: the board it builds must hold, per patient, exactly the alerts that still stand. A clinician's
app copies that snippet; a board that kept resolved or withdrawn alerts would show them forever."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import orjson

from schemas import codes
from streams.patient_agent import PatientRecord
from tests.streams.test_patient_agent import (NORMAL, T0, MIN, amendment, msg, processor, retraction,  # noqa: F401
                                              run, settings, vitals)

README = Path(__file__).resolve().parents[1] / "README.md"


def consumer_snippet() -> str:
    section = README.read_text().split("## Consuming alerts and risk", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class _Drained(Exception):
    """Ends the snippet's `while True` once every record was polled."""


class _Message:
    def __init__(self, value: bytes):
        self._value = value

    def value(self) -> bytes:
        return self._value

    def error(self):
        return None


def run_snippet(values: list[bytes], monkeypatch) -> dict:
    pending = list(values)

    class Consumer:
        def __init__(self, config: dict):
            pass

        def subscribe(self, topics: list[str]) -> None:
            pass

        def poll(self, timeout: float):
            if not pending:
                raise _Drained
            return _Message(pending.pop(0))

    monkeypatch.setitem(sys.modules, "confluent_kafka", types.SimpleNamespace(Consumer=Consumer))
    namespace: dict = {"print": lambda *args: None}
    try:
        exec(compile(consumer_snippet(), str(README), "exec"), namespace)
    except _Drained:
        pass
    return namespace["board"]


def test_the_readme_consumer_keeps_only_the_alerts_that_still_stand(processor, monkeypatch):
    store: dict[str, PatientRecord] = {}
    messages = [
        # p1: opened (NEWS2 high), then two calm sets: resolved
        msg(0, vitals("p1", T0, 1)), msg(1, vitals("p1", T0 + 10 * MIN, 2, **NORMAL)),
        msg(2, vitals("p1", T0 + 20 * MIN, 3, **NORMAL)),
        # p2: opened on RR 26 + SpO2 93 (medium), then the RR entered in error: withdrawn
        msg(3, vitals("p2", T0, 4, **{**NORMAL, "rr": 26, "spo2": 93})), msg(4, [retraction("p2", T0, 4, codes.RESP_RATE, 5)]),
        # p3: opened, then a basis value amended (still high): the amended alert stands
        msg(5, vitals("p3", T0, 6)), msg(6, [amendment("p3", T0, 6, codes.RESP_RATE, 7, 30.0)]),
        # p4: opened medium, escalated to high: both alerts of its episode stand
        msg(7, vitals("p4", T0, 8, **{**NORMAL, "sbp": 85})), msg(8, vitals("p4", T0 + 10 * MIN, 9)),
    ]
    values = [value for m in messages for _, value, _ in run(processor, [m], store).alerts]
    kinds = [orjson.loads(v)["header"]["kind"] for v in values]
    assert kinds.count("resolve") == 1 and kinds.count("correction") == 2 and kinds.count("escalate") == 1
    # at-least-once: a worker restart repeats records (the same ids)
    board = run_snippet(values + values[:3], monkeypatch)

    standing = {patient: sorted((a["header"]["kind"], a["resource"]["status"]) for a in alerts.values())
                for patient, alerts in board.items() if alerts}
    assert standing == {"p3": [("correction", "amended")], "p4": [("escalate", "final"), ("open", "final")]}
    [p3] = board["p3"].values()
    assert p3["resource"]["id"] == p3["header"]["original_alert_id"]  # the amendment replaced the alert it corrects
