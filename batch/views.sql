-- Views for analysts over the nightly DuckDB file (created by batch/catalog.py create_views).
-- Placeholders (a dollar sign and a name) are filled from schemas/codes.py and batch/train.py, so the clinical
-- thresholds live in one place.

-- One row per patient, time and item: observations (current versions), scores and alerts together.
CREATE OR REPLACE VIEW patient_timeline AS
SELECT patient_id, effective_ms AS time_ms, epoch_ms(effective_ms) AS time_utc, 'observation' AS kind,
       code AS item, value, value_text AS detail, encounter_id
FROM observations
UNION ALL
SELECT patient_id, scoring_ms, epoch_ms(scoring_ms), 'score', coalesce(model_version, 'news2-rule'), probability,
       'news2=' || coalesce(CAST(news2 AS VARCHAR), '?') || ' tier=' || coalesce(tier, '?'), NULL
FROM scores
UNION ALL
SELECT patient_id, scoring_ms, epoch_ms(scoring_ms), 'alert', kind, NULL, tier, encounter_id
FROM alerts;
COMMENT ON VIEW patient_timeline IS 'One row per patient, time and item: observations (current versions), scores and alerts; kind says which';

-- The events that make a label positive (the same criteria as batch/train.py, facts in hindsight).
CREATE OR REPLACE VIEW label_events AS
SELECT patient_id, effective_ms AS event_ms, 'systolic BP <= $LOW_SBP' AS criterion
FROM observations WHERE code = '$SYSTOLIC_BP' AND value <= $LOW_SBP
UNION ALL
SELECT patient_id, effective_ms, 'lactate >= $HIGH_LACTATE' FROM observations WHERE code = '$LACTATE' AND value >= $HIGH_LACTATE
UNION ALL
SELECT patient_id, scoring_ms, 'NEWS2 >= $NEWS2_HIGH' FROM labels WHERE news2 >= $NEWS2_HIGH;
COMMENT ON VIEW label_events IS 'Deterioration events that make a label positive: low systolic BP, high lactate, NEWS2 emergency score';

-- Each alert, whether a label event followed within the horizon, and the lead time to the first one.
CREATE OR REPLACE VIEW alert_outcomes AS
SELECT a.alert_id, a.kind, a.tier, a.patient_id, a.encounter_id, a.scoring_ms, a.model_version, a.path,
       min(e.event_ms) AS outcome_ms,
       arg_min(e.criterion, e.event_ms) AS outcome_criterion,
       min(e.event_ms) IS NOT NULL AS outcome_followed,
       (min(e.event_ms) - a.scoring_ms) / 3600000.0 AS lead_time_h
FROM alerts a
LEFT JOIN label_events e
  ON e.patient_id = a.patient_id AND e.event_ms > a.scoring_ms AND e.event_ms <= a.scoring_ms + $HORIZON_MS
GROUP BY a.alert_id, a.kind, a.tier, a.patient_id, a.encounter_id, a.scoring_ms, a.model_version, a.path
ORDER BY a.scoring_ms, a.alert_id, a.kind;
COMMENT ON VIEW alert_outcomes IS 'Each alert: did a label event follow within the horizon (outcome_followed), which, and the lead time in hours';

-- Per UTC day and model version: discrimination (AUROC by the rank-sum formula, ties averaged) of the
-- served risk and of NEWS2 on the same labelled scoring points, and the alert rate.
CREATE OR REPLACE VIEW model_performance_daily AS
WITH scored AS (
    SELECT CAST(epoch_ms(s.scoring_ms) AS DATE) AS day, coalesce(s.model_version, 'news2-rule') AS model_version,
           s.patient_id, coalesce(s.probability, s.news2) AS risk, s.news2 AS news2, l.label
    FROM scores s JOIN labels l USING (patient_id, scoring_ms, "partition", "offset")
    WHERE coalesce(s.probability, s.news2) IS NOT NULL AND s.news2 IS NOT NULL
), ranked AS (
    SELECT *,
           rank() OVER (PARTITION BY day, model_version ORDER BY risk)
             + (count(*) OVER (PARTITION BY day, model_version, risk) - 1) / 2.0 AS risk_rank,
           rank() OVER (PARTITION BY day, model_version ORDER BY news2)
             + (count(*) OVER (PARTITION BY day, model_version, news2) - 1) / 2.0 AS news2_rank
    FROM scored
), perf AS (
    SELECT day, model_version, count(*) AS scored_points, count(DISTINCT patient_id) AS patients,
           sum(label) AS positives,
           (sum(risk_rank) FILTER (WHERE label = 1) - sum(label) * (sum(label) + 1) / 2.0)
             / nullif(sum(label) * (count(*) - sum(label)), 0) AS auroc,
           (sum(news2_rank) FILTER (WHERE label = 1) - sum(label) * (sum(label) + 1) / 2.0)
             / nullif(sum(label) * (count(*) - sum(label)), 0) AS news2_auroc
    FROM ranked GROUP BY day, model_version
), opened AS (
    SELECT CAST(epoch_ms(scoring_ms) AS DATE) AS day, coalesce(model_version, 'news2-rule') AS model_version,
           count(*) AS alerts_opened
    FROM alerts WHERE kind = 'open' GROUP BY 1, 2
)
SELECT p.day, p.model_version, p.scored_points, p.patients, p.positives,
       p.positives / p.scored_points AS positive_rate, p.auroc, p.news2_auroc,
       coalesce(o.alerts_opened, 0) AS alerts_opened,
       100.0 * coalesce(o.alerts_opened, 0) / p.patients AS alerts_per_100_patients
FROM perf p LEFT JOIN opened o USING (day, model_version)
ORDER BY p.day, p.model_version;
COMMENT ON VIEW model_performance_daily IS 'Per UTC day and model version: AUROC of the served risk and of NEWS2 on labelled scoring points, positives, alerts opened per 100 patients scored';
