-- Views for analysts over the nightly DuckDB file (created by batch/catalog.py create_views).
-- Placeholders (a dollar sign and a name) are filled from schemas/codes.py and batch/train.py, so the clinical
-- thresholds live in one place.

-- One row per patient, time and item: observations (current versions), scores and alerts together. A
-- measurement both feeds carried is shown once: its cross-source copy (outcome duplicate) is left out. A late
-- one (beyond the lateness bound) is shown at its clinical time but says so: the stream never used it, so it
-- is not what the scores and alerts around it saw.
CREATE OR REPLACE VIEW patient_timeline AS
SELECT patient_id, effective_ms AS time_ms, epoch_ms(effective_ms) AS time_utc, 'observation' AS kind,
       code AS item, value,
       CASE WHEN outcome = 'late' THEN concat_ws(' ', value_text, 'late: never in the stream''s state')
            ELSE value_text END AS detail,
       encounter_id
FROM observations
WHERE outcome IS DISTINCT FROM 'duplicate'
UNION ALL
SELECT patient_id, scoring_ms, epoch_ms(scoring_ms), 'score', coalesce(model_version, 'news2-rule'), probability,
       'news2=' || coalesce(CAST(news2 AS VARCHAR), '?') || ' tier=' || coalesce(tier, '?'), NULL
FROM scores
UNION ALL
SELECT patient_id, scoring_ms, epoch_ms(scoring_ms), 'alert', kind, NULL, tier, encounter_id
FROM alerts;
COMMENT ON VIEW patient_timeline IS 'One row per patient, time and item: observations (current versions; a measurement both feeds carried once; a late one marked in detail), scores and alerts; kind says which';

-- The onset episodes of the label (batch/train.py make_labels): one row per patient and onset time that some
-- at-risk scoring point predicts, with the criterion met at that time (facts in hindsight, as the label uses).
CREATE OR REPLACE VIEW label_events AS
WITH criteria AS (
    SELECT patient_id, effective_ms AS event_ms, 'systolic BP <= $LOW_SBP' AS criterion
    FROM observations WHERE code = '$SYSTOLIC_BP' AND value <= $LOW_SBP
    UNION ALL
    SELECT patient_id, effective_ms, 'lactate >= $HIGH_LACTATE' FROM observations WHERE code = '$LACTATE' AND value >= $HIGH_LACTATE
    UNION ALL
    SELECT patient_id, scoring_ms, 'NEWS2 >= $NEWS2_HIGH' FROM labels WHERE news2 >= $NEWS2_HIGH
), onsets AS (
    SELECT patient_id, onset_ms, count(*) AS positive_points, min(scoring_ms) AS first_positive_ms
    FROM labels WHERE label = 1 AND at_risk AND onset_ms IS NOT NULL
    GROUP BY patient_id, onset_ms
)
SELECT o.patient_id, o.onset_ms, epoch_ms(o.onset_ms) AS onset_utc,
       string_agg(DISTINCT c.criterion, ', ' ORDER BY c.criterion) AS criterion,
       o.positive_points, o.first_positive_ms
FROM onsets o
LEFT JOIN criteria c ON c.patient_id = o.patient_id AND c.event_ms = o.onset_ms
GROUP BY o.patient_id, o.onset_ms, o.positive_points, o.first_positive_ms
ORDER BY o.onset_ms, o.patient_id;
COMMENT ON VIEW label_events IS 'Onset episodes of the first-onset label: patient, onset time, criterion met then (low systolic BP, high lactate, NEWS2 emergency score), how many at-risk scoring points predicted it';

-- Each alert against the label of its scoring point: was the patient at risk then (not yet deteriorated),
-- did the first onset follow within the horizon, and the lead time to it. outcome_followed is null when the
-- alert cannot be evaluated: the patient was already deteriorated, or the alert is not at a labelled point.
-- withdrawn: a correction later withdrew the alert (entered-in-error: its basis was wrong), so a count of
-- alerts that stood leaves it out; the correction records themselves carry original_alert_id instead.
CREATE OR REPLACE VIEW alert_outcomes AS
WITH at_point AS (  -- every label row of one patient and time carries the same at_risk and onset
    SELECT patient_id, scoring_ms, bool_or(at_risk) AS at_risk, min(onset_ms) AS onset_ms
    FROM labels GROUP BY patient_id, scoring_ms
), last_correction AS (  -- a patient's alerts share one partition: the offset orders its corrections
    SELECT original_alert_id, arg_max(status, kafka_offset) AS status
    FROM alerts WHERE kind = 'correction' AND original_alert_id IS NOT NULL GROUP BY original_alert_id
)
SELECT a.alert_id, a.kind, a.tier, a.patient_id, a.encounter_id, a.ward, a.scoring_ms, a.model_version, a.path,
       a.status, a.original_alert_id,
       CASE WHEN a.kind <> 'correction' THEN coalesce(c.status = 'entered-in-error', false) END AS withdrawn,
       l.at_risk,
       CASE WHEN l.at_risk THEN l.onset_ms END AS outcome_ms,
       CASE WHEN l.at_risk THEN e.criterion END AS outcome_criterion,
       CASE WHEN l.at_risk THEN l.onset_ms IS NOT NULL END AS outcome_followed,
       CASE WHEN l.at_risk THEN (l.onset_ms - a.scoring_ms) / 3600000.0 END AS lead_time_h
FROM alerts a
LEFT JOIN at_point l ON l.patient_id = a.patient_id AND l.scoring_ms = a.scoring_ms
LEFT JOIN label_events e ON e.patient_id = a.patient_id AND e.onset_ms = l.onset_ms
LEFT JOIN last_correction c ON c.original_alert_id = a.alert_id
ORDER BY a.scoring_ms, a.alert_id, a.kind;
COMMENT ON VIEW alert_outcomes IS 'Each alert record (every kind: filter kind = ''open'' for episodes opened, AND NOT withdrawn for those that stood) against the onset label of its scoring point: at_risk, did the first onset follow within the horizon (outcome_followed; null when not evaluable), its criterion and the lead time in hours';

-- Per UTC day and model version: discrimination (AUROC by the rank-sum formula, ties averaged) of the
-- served risk and of NEWS2 on the same labelled at-risk scoring points (the label's evaluation rows), and the
-- volume and alert rate over every score the stream published: the rule path's points without NEWS2 (and the
-- alerts they opened) have no model version and count under 'news2-rule' (they have no risk to rank).
CREATE OR REPLACE VIEW model_performance_daily AS
WITH served AS (
    SELECT CAST(epoch_ms(scoring_ms) AS DATE) AS day, coalesce(model_version, 'news2-rule') AS model_version,
           patient_id
    FROM scores
), scored AS (
    SELECT CAST(epoch_ms(s.scoring_ms) AS DATE) AS day, coalesce(s.model_version, 'news2-rule') AS model_version,
           s.patient_id, coalesce(s.probability, s.news2) AS risk, s.news2 AS news2, l.label, l.at_risk
    FROM scores s JOIN labels l USING (snapshot_id)  -- one label per scoring point: its snapshot
    WHERE coalesce(s.probability, s.news2) IS NOT NULL AND s.news2 IS NOT NULL
), ranked AS (
    SELECT *,
           rank() OVER (PARTITION BY day, model_version ORDER BY risk)
             + (count(*) OVER (PARTITION BY day, model_version, risk) - 1) / 2.0 AS risk_rank,
           rank() OVER (PARTITION BY day, model_version ORDER BY news2)
             + (count(*) OVER (PARTITION BY day, model_version, news2) - 1) / 2.0 AS news2_rank
    FROM scored WHERE at_risk
), perf AS (
    SELECT day, model_version, count(*) AS at_risk_points, sum(label) AS positives,
           (sum(risk_rank) FILTER (WHERE label = 1) - sum(label) * (sum(label) + 1) / 2.0)
             / nullif(sum(label) * (count(*) - sum(label)), 0) AS auroc,
           (sum(news2_rank) FILTER (WHERE label = 1) - sum(label) * (sum(label) + 1) / 2.0)
             / nullif(sum(label) * (count(*) - sum(label)), 0) AS news2_auroc
    FROM ranked GROUP BY day, model_version
), volume AS (
    SELECT day, model_version, count(*) AS scored_points, count(DISTINCT patient_id) AS patients
    FROM served GROUP BY day, model_version
), opened AS (
    SELECT CAST(epoch_ms(scoring_ms) AS DATE) AS day, coalesce(model_version, 'news2-rule') AS model_version,
           count(*) AS alerts_opened
    FROM alerts WHERE kind = 'open' GROUP BY 1, 2
), days AS (  -- an alert whose score is not archived still counts
    SELECT day, model_version FROM volume UNION SELECT day, model_version FROM opened
)
SELECT d.day, d.model_version, coalesce(v.scored_points, 0) AS scored_points, coalesce(v.patients, 0) AS patients,
       coalesce(p.at_risk_points, 0) AS at_risk_points, coalesce(p.positives, 0) AS positives,
       p.positives / p.at_risk_points AS positive_rate, p.auroc, p.news2_auroc,
       coalesce(o.alerts_opened, 0) AS alerts_opened,
       100.0 * coalesce(o.alerts_opened, 0) / nullif(v.patients, 0) AS alerts_per_100_patients
FROM days d
LEFT JOIN volume v USING (day, model_version)
LEFT JOIN perf p USING (day, model_version)
LEFT JOIN opened o USING (day, model_version)
ORDER BY d.day, d.model_version;
COMMENT ON VIEW model_performance_daily IS 'Per UTC day and model version (news2-rule: rule-path points without NEWS2, no model version): AUROC of the served risk and of NEWS2 on labelled at-risk scoring points, onset positives among them, every score and alert opened, alerts opened per 100 patients scored';
