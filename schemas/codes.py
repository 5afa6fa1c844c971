"""Clinical codes and the one declarative mapping from EHR tables/columns to LOINC.

Both ingest parsers (CDC and FHIR) map into these codes, so the same measurement from either source
is recognisable downstream as the same fact.
"""

from __future__ import annotations

from dataclasses import dataclass

# canonical LOINC codes used by features and scores
HEART_RATE = "8867-4"
RESP_RATE = "9279-1"
SPO2 = "59408-5"  # pulse oximetry; 2708-6 is accepted as an alias
O2_FLOW = "3151-8"  # inhaled oxygen flow, L/min; > 0 means on oxygen
FIO2 = "3150-0"  # inhaled oxygen concentration, %; above 21 (room air) means on oxygen
# On supplemental oxygen with the flow not charted (a CDC vitals row: on-oxygen flag true, flow null):
# value 1.0. NEWS2 needs only "air or oxygen", so this counts as oxygen there, while no flow value is
# invented (the flow feature stays missing). wardwatch's own code, not LOINC: it is derived, never read
# from a source's code (canonical_code ignores it), and its events carry code system WARDWATCH.
SUPPLEMENTAL_O2 = "supplemental-oxygen"
WARDWATCH = "urn:wardwatch:observation"
DERIVED_CODES = frozenset({SUPPLEMENTAL_O2})
SYSTOLIC_BP = "8480-6"
DIASTOLIC_BP = "8462-4"
TEMPERATURE = "8310-5"
CONSCIOUSNESS = "80288-4"  # ACVPU, value holds the ordinal (A=0 ... U=4)
LACTATE = "2524-7"
WBC = "6690-2"
CREATININE = "2160-0"
PLATELETS = "777-3"
BP_PANEL = "85354-9"

# alternative codes that mean the same parameter -> canonical code
ALIASES: dict[str, str] = {
    "2708-6": SPO2,
    "32693-4": LACTATE,
    "26464-8": WBC,
    "38483-4": CREATININE,
    "26515-7": PLATELETS,
}

ACVPU = ("A", "C", "V", "P", "U")
ACVPU_ORDINAL = {letter: i for i, letter in enumerate(ACVPU)}
# SNOMED CT codes for ACVPU levels as FHIR servers send them: HL7 UK Care Connect's ACVPU value set,
# plus the voice and pain codes clinosim emits (so its FHIR output scores V and P, not dead letters)
SNOMED_ACVPU = {
    "248234008": "A",  # mentally alert
    "130987000": "C",  # acute confusion
    "300202002": "V",  # responds to voice
    "248236005": "V",  # responds to voice (clinosim)
    "450847001": "P",  # responds to pain
    "248237001": "P",  # responds to pain (clinosim)
    "422768004": "U",  # unresponsive
}

# Glasgow Coma Scale total (LOINC 9269-2, 3..15), what most US EHRs chart instead of ACVPU. Ingest maps it
# onto the consciousness code (one fact, the ACVPU ordinal), so features, NEWS2, qSOFA and the offline
# rebuild read one scale. NEWS2 (RCP 2017) scores anything but Alert 3: GCS 15 is A, any lower total
# is not. The other levels follow the median GCS of each AVPU level in two published comparisons,
# Kelly et al. 2004 (Ann Emerg Med 44:108; A 15, V 13, P 8, U 3) and McNarry & Goldhill 2004
# (Anaesthesia 59:34; A 15, V 13, P 8, U 6): V 11-13 and P 7-10 (cut halfway between 13 and 8),
# U 3-6 (up to the higher U median). 14 is C: one point below normal, nearly always a confused verbal
# response (GCS V4), what ACVPU's C names. A GCS cannot say whether confusion is new (README,
# "Consciousness charted as a GCS").
GCS_TOTAL = "9269-2"
GCS_RANGE = (3, 15)
# The three GCS components (LOINC): a 9269-2 panel charted without its total is the sum of the three, when
# all three are there (an intubated patient's verbal response is "not testable": no total). Each is an
# integer score, or a LOINC answer of its own answer list (LL355-9, LL356-7, LL357-5, as the FHIR GCS
# Questionnaire example lists them), worst to best.
GCS_EYE, GCS_VERBAL, GCS_MOTOR = "9267-6", "9270-0", "9268-4"
GCS_COMPONENTS = {GCS_EYE: ("GCS eye", (1, 4)), GCS_VERBAL: ("GCS verbal", (1, 5)), GCS_MOTOR: ("GCS motor", (1, 6))}
GCS_ANSWERS = {
    GCS_EYE: {"LA6553-7": 1, "LA6554-5": 2, "LA6555-2": 3, "LA6556-0": 4},
    GCS_VERBAL: {"LA6557-8": 1, "LA6558-6": 2, "LA6559-4": 3, "LA6560-2": 4, "LA6561-0": 5},
    GCS_MOTOR: {"LA6562-8": 1, "LA6563-6": 2, "LA6564-4": 3, "LA6565-1": 4, "LA6566-9": 5, "LA6567-7": 6},
}


def gcs_acvpu(total: int) -> str:
    """The ACVPU letter a GCS total (3..15, checked by the caller) stands for."""
    if total >= 15:
        return "A"
    if total == 14:
        return "C"
    if total >= 11:
        return "V"
    return "P" if total >= 7 else "U"


@dataclass(frozen=True, slots=True)
class CodeInfo:
    code: str
    name: str
    unit: str  # canonical UCUM code
    plausible: tuple[float, float]  # values outside are dead-lettered as implausible


CODES: dict[str, CodeInfo] = {
    c.code: c
    for c in (
        CodeInfo(HEART_RATE, "heart_rate", "/min", (10, 300)),
        CodeInfo(RESP_RATE, "resp_rate", "/min", (1, 80)),
        CodeInfo(SPO2, "spo2", "%", (40, 100)),
        CodeInfo(O2_FLOW, "o2_flow", "L/min", (0, 80)),
        # room air is 21 %: a lower concentration is not a measurement (e.g. a fraction sent as "%")
        CodeInfo(FIO2, "fio2", "%", (21, 100)),
        CodeInfo(SUPPLEMENTAL_O2, "supplemental_oxygen", "{flag}", (1, 1)),
        CodeInfo(SYSTOLIC_BP, "systolic_bp", "mm[Hg]", (30, 300)),
        CodeInfo(DIASTOLIC_BP, "diastolic_bp", "mm[Hg]", (10, 200)),
        CodeInfo(TEMPERATURE, "temperature", "Cel", (25, 45)),
        CodeInfo(CONSCIOUSNESS, "consciousness", "{score}", (0, 4)),
        CodeInfo(LACTATE, "lactate", "mmol/L", (0, 40)),
        CodeInfo(WBC, "wbc", "10*3/uL", (0, 500)),
        CodeInfo(CREATININE, "creatinine", "mg/dL", (0, 40)),
        CodeInfo(PLATELETS, "platelets", "10*3/uL", (0, 3000)),
    )
}


def parameter_name(code: str) -> str:
    """A code's parameter for a human, e.g. "lactate (LOINC 2524-7)"."""
    info = CODES.get(code)
    if code in DERIVED_CODES:
        return "supplemental oxygen, flow not charted"
    return f"{info.name.replace('_', ' ')} (LOINC {code})" if info else f"LOINC {code}"


def canonical_code(code: str) -> str | None:
    """The canonical code for a source code, or None when wardwatch does not use it."""
    code = ALIASES.get(code, code)
    return code if code in CODES and code not in DERIVED_CODES else None


# unit conversions to the canonical unit: (code, source unit) -> function
def _f_to_c(v: float) -> float:
    return round((v - 32.0) * 5.0 / 9.0, 2)


def _fraction_to_percent(v: float) -> float:
    return round(v * 100.0, 1)  # 0.28 * 100 is 28.000000000000004: one decimal gives 28.0


# a conversion here means the code is reported in more than one unit (see MULTI_UNIT_CODES)
UNIT_CONVERSIONS = {
    (TEMPERATURE, "[degF]"): _f_to_c,
    (TEMPERATURE, "degF"): _f_to_c,
    (TEMPERATURE, "°F"): _f_to_c,
    (WBC, "/uL"): lambda v: v / 1000.0,
    (CREATININE, "umol/L"): lambda v: round(v / 88.42, 3),
    # lactate in mg/dL (some US labs): 90.08 g/mol, so 9.008 mg/dL per mmol/L (18 mg/dL is 2.0 mmol/L)
    (LACTATE, "mg/dL"): lambda v: round(v / 9.008, 2),
    # FiO2 as a fraction (0.28): UCUM's dimensionless "1", a volume fraction, or an annotation
    (FIO2, "1"): _fraction_to_percent,
    (FIO2, "L/L"): _fraction_to_percent,
    (FIO2, "{fraction}"): _fraction_to_percent,
}
# other spellings of a code's canonical unit (the same number): not a second unit
UNIT_SPELLINGS = {
    (WBC, "10*9/L"), (PLATELETS, "10*9/L"), (HEART_RATE, "{beats}/min"), (RESP_RATE, "{breaths}/min"),
}
# "degC" is not UCUM but EHRs send it, as they send "degF" (converted above)
UNIT_ALIASES = {"Cel": "Cel", "C": "Cel", "°C": "Cel", "degC": "Cel", "mmHg": "mm[Hg]", "bpm": "/min", "beats/min": "/min",
                "breaths/min": "/min"}
# Codes reported in more than one unit: for these a value without a unit is ambiguous (a lactate of 18 may be
# mg/dL, ~2 mmol/L, not a critical 18 mmol/L), so it is dead-lettered unknown_unit. For any other code (SpO2 %,
# heart rate /min, ...) a value without a unit is in the canonical unit, the common case for vitals.
MULTI_UNIT_CODES = frozenset(code for code, _ in UNIT_CONVERSIONS)


def to_canonical_unit(code: str, value: float, unit: str | None) -> float | None:
    """Convert value to the canonical unit of code; None when the unit is unknown for that code, or missing
    (None) for a code reported in more than one unit (MULTI_UNIT_CODES; see missing_unit_detail)."""
    info = CODES[code]
    if unit is None:
        return None if code in MULTI_UNIT_CODES else value
    if unit == info.unit or UNIT_ALIASES.get(unit) == info.unit or (code, unit) in UNIT_SPELLINGS:
        return value
    conv = UNIT_CONVERSIONS.get((code, unit))
    return conv(value) if conv else None


def missing_unit_detail(code: str) -> str:
    """The dead-letter detail of a value without a unit for a code in MULTI_UNIT_CODES (never the value)."""
    name = CODES[code].name
    return f"{name}: value without a unit, and {name} is reported in more than one unit"


# --- the one declarative CDC mapping: one entry per EHR table, saying its shape ------------------
# schemas/cdc.py interprets these declarations and never names a table. The column names are those of
# deploy/postgres/ehr-schema.sql (the contract with the hospital's database and the Debezium connector).
# Three shapes:
#   TableMapping  a wide row: one event per non-null mapped column (a flowsheet row of vitals)
#   LongTable     a long row: one row is one coded result (code, value and unit in columns)
#   ContextTable  a row that states CONTEXT facts (admission, ward, discharge, sex, birth year)


@dataclass(frozen=True, slots=True)
class TableMapping:
    """Wide: one row, many measurements; fact id cdc:<table>:<pk>:<code>."""

    table: str
    patient_column: str
    time_column: str
    columns: dict[str, tuple[str, str]]  # column -> (canonical code, unit of the column)
    encounter_column: str | None = None
    pk_column: str = "id"  # names the row in fact ids: cdc:<table>:<pk>:<code>
    # (flow column, on-oxygen flag column): a null flow with the flag false is a flow of 0 (on air), with
    # the flag true a SUPPLEMENTAL_O2 fact (on oxygen, flow not charted), fact id cdc:<table>:<pk>:<that code>
    on_air: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class LongTable:
    """Long: one row is one result of a coded test; fact id cdc:<table>:<pk>:<canonical code>."""

    table: str
    patient_column: str
    code_column: str  # LOINC; aliases accepted (canonical_code); other codes are ignored, counted
    value_column: str
    unit_column: str  # UCUM; converted to the code's canonical unit (to_canonical_unit)
    time_column: str  # effective: when the specimen was collected
    issued_column: str  # issued: when the result became available (hours after collection for labs)
    status_column: str  # preliminary | final | amended | corrected | entered-in-error, cancelled (retract)
    codes: tuple[str, ...]  # the codes a row may carry; a delete whose `before` lacks the code retracts each
    encounter_column: str | None = None
    pk_column: str = "id"


@dataclass(frozen=True, slots=True)
class ContextFact:
    """One CONTEXT fact a row states (code ADMISSION, LOCATION, ...; see the context section below).

    The fact exists while `present_column` (default: its text or year column) is non-null.
    fact id cdc:<table>:<pk>:<code>, plus :<effective ms> when `per_time` (each transfer is its own fact).
    """

    code: str
    time_column: str  # effective time on c (and on u / r unless update_time_column is set in the row)
    text_column: str | None = None  # value_text
    year_column: str | None = None  # value = the year of this date (minimum necessary PHI: never the date)
    present_column: str | None = None
    update_time_column: str | None = None  # effective time on u / r: a transfer happens at updated_at
    per_time: bool = False
    allowed_text: tuple[str, ...] | None = None  # value_text vocabulary (lower case); others are bad values

    @property
    def presence(self) -> str | None:
        return self.present_column or self.text_column or self.year_column


@dataclass(frozen=True, slots=True)
class ContextTable:
    """A row of encounter or patient context: each declared fact becomes one CONTEXT event."""

    table: str
    patient_column: str
    pk_column: str
    facts: tuple[ContextFact, ...]
    encounter_column: str | None = None


CdcMapping = TableMapping | LongTable | ContextTable

# --- context facts: who and where the patient is, not measurements ------------------------------
# Canonical events with code_system CONTEXT carry encounter and patient facts from CDC (encounters,
# patients tables) and FHIR (Encounter, Patient). They never enter feature windows (the patient
# agent keeps them in the patient record; the batch builds `encounters`/`patients` tables from them).
# Their `value` is None; the payload is `value_text`. Only minimum necessary PHI: no names, no dates
# of birth (birth year only).
CONTEXT = "urn:wardwatch:context"
ADMISSION = "admission"  # effective: admitted_at; value_text: encounter class (e.g. "inpatient")
LOCATION = "location"  # effective: when the patient arrived on the ward (admission or transfer); value_text: ward
DISCHARGE = "discharge"  # effective: discharged_at; value_text: None
SEX = "sex"  # effective: the record's update time; value_text: male | female | other | unknown
BIRTH_YEAR = "birth-year"  # effective: the record's update time; value: the year (an int as float)
CONTEXT_CODES = (ADMISSION, LOCATION, DISCHARGE, SEX, BIRTH_YEAR)


def is_context(code_system: str) -> bool:
    return code_system == CONTEXT


# --- version markers: a FHIR Observation version that carries no mapped code ---------------------
# A version after the first whose code wardwatch does not map (recoded), or whose every value is absent
# (dataAbsentReason, an incomplete GCS), still replaces its resource's earlier facts (docs/patient-state.md,
# rule 6). It becomes one canonical event of code VERSION_MARK (code_system VERSION_MARKS, fact id
# "fhir:Observation/<id>:version"), status entered-in-error, no value, `version_codes` empty: the retraction
# of a fact that is never live, so no feature, score or table reads it as a reading; rule 6 retracts every
# fact of the resource an earlier version gave, and an older version arriving after it is stale.
VERSION_MARK = "version"
VERSION_MARKS = "urn:wardwatch:version"


# --- the mapping itself ----------------------------------------------------------------------------
ADMINISTRATIVE_SEX = ("male", "female", "other", "unknown")

CDC_TABLES: dict[str, CdcMapping] = {
    "vital_signs": TableMapping(
        table="vital_signs",
        patient_column="patient_id",
        time_column="measured_at",
        encounter_column="encounter_id",
        columns={
            "heart_rate": (HEART_RATE, "/min"),
            "respiratory_rate": (RESP_RATE, "/min"),
            "spo2": (SPO2, "%"),
            "oxygen_flow_rate_lpm": (O2_FLOW, "L/min"),
            "systolic_bp": (SYSTOLIC_BP, "mm[Hg]"),
            "diastolic_bp": (DIASTOLIC_BP, "mm[Hg]"),
            "temperature": (TEMPERATURE, "Cel"),
            "consciousness_level": (CONSCIOUSNESS, "{score}"),
        },
        on_air=("oxygen_flow_rate_lpm", "on_supplemental_oxygen"),
    ),
    "lab_results": LongTable(
        table="lab_results",
        patient_column="patient_id",
        encounter_column="encounter_id",
        code_column="loinc_code",
        value_column="value",
        unit_column="unit",
        time_column="collected_at",
        issued_column="resulted_at",
        status_column="status",
        codes=(LACTATE, WBC, CREATININE, PLATELETS),
    ),
    "encounters": ContextTable(
        table="encounters",
        patient_column="patient_id",
        pk_column="encounter_id",
        encounter_column="encounter_id",
        facts=(
            ContextFact(ADMISSION, time_column="admitted_at", text_column="encounter_class",
                        present_column="admitted_at"),
            # a transfer is an update that changes the ward: its own fact, at the update's time (a
            # snapshot read states the ward at updated_at too: the row shows only the latest ward)
            ContextFact(LOCATION, time_column="admitted_at", text_column="ward",
                        update_time_column="updated_at", per_time=True),
            ContextFact(DISCHARGE, time_column="discharged_at", present_column="discharged_at"),
        ),
    ),
    "patients": ContextTable(
        table="patients",
        patient_column="patient_id",
        pk_column="patient_id",
        facts=(
            ContextFact(SEX, time_column="updated_at", text_column="sex", allowed_text=ADMINISTRATIVE_SEX),
            ContextFact(BIRTH_YEAR, time_column="updated_at", year_column="birth_date"),
        ),
    ),
}
