-- The EHR tables wardwatch maps (schemas/codes.py CDC_TABLES is the one mapping from these columns
-- to canonical codes). A hospital's real flowsheet schema differs; map it there, not in the parser.
-- Debezium reads them through the pgoutput plugin (wal_level=logical) and keys every topic by
-- patient_id (message.key.columns), so one patient's changes stay in one partition, in commit order.

CREATE TABLE IF NOT EXISTS patients (
    patient_id      text PRIMARY KEY,          -- the MRN; FHIR Patient.identifier carries the same value
    birth_date      date,
    sex             text,                      -- administrative gender: male | female | other | unknown
    updated_at      timestamp NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS encounters (
    encounter_id    text PRIMARY KEY,
    patient_id      text NOT NULL REFERENCES patients (patient_id),
    encounter_class text NOT NULL DEFAULT 'inpatient',
    status          text NOT NULL,             -- planned | in-progress | finished | cancelled
    ward            text,                      -- current ward; an update that changes it is a transfer
    bed             text,
    admitted_at     timestamp NOT NULL,
    discharged_at   timestamp,
    updated_at      timestamp NOT NULL DEFAULT now()   -- clinical time of the latest change (transfer time)
);

CREATE TABLE IF NOT EXISTS vital_signs (
    id                      bigserial PRIMARY KEY,
    patient_id              text NOT NULL,
    encounter_id            text,
    measured_at             timestamp NOT NULL,
    heart_rate              integer,
    respiratory_rate        integer,
    spo2                    numeric(5, 1),
    oxygen_flow_rate_lpm    numeric(4, 1),
    on_supplemental_oxygen  boolean,
    systolic_bp             integer,
    diastolic_bp            integer,
    temperature             numeric(4, 1),
    consciousness_level     text               -- ACVPU letter
);

CREATE TABLE IF NOT EXISTS lab_results (
    id              bigserial PRIMARY KEY,
    patient_id      text NOT NULL,
    encounter_id    text,
    loinc_code      text NOT NULL,
    value           numeric(12, 4),
    unit            text,                      -- UCUM
    status          text NOT NULL DEFAULT 'final',  -- preliminary | final | amended | corrected | entered-in-error | cancelled
    collected_at    timestamp NOT NULL,        -- effective (clinical) time
    resulted_at     timestamp NOT NULL         -- issued: when the value became available
);

CREATE INDEX IF NOT EXISTS vital_signs_patient_time ON vital_signs (patient_id, measured_at);
CREATE INDEX IF NOT EXISTS lab_results_patient_time ON lab_results (patient_id, collected_at);
CREATE INDEX IF NOT EXISTS encounters_patient ON encounters (patient_id);
