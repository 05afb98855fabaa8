"""The demo's data: the archive the simulated nodes share, C-FIND matching (PS3.4 C.2.2.2) over it, the
modality worklist, and the demo study storescu sends. pydicom is imported where it is used."""

from __future__ import annotations

import copy
import datetime
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacslb.errors import PacslbError

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

from pacslb.demo.layout import DEMO_PATIENT_ID, DEMO_PATIENT_NAME, DEMO_STUDY_INSTANCES

log = logging.getLogger("pacslb.demo")

# -- the shared archive ------------------------------------------------------------------------------

# Attributes kept at each query level (PS3.4 C.6.1.1 / C.6.2.1; a useful subset, not every optional key).
PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
)
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime")
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": PATIENT_KEYS,
    "STUDY": PATIENT_KEYS + STUDY_KEYS,
    "SERIES": PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS,
    "IMAGE": PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS + IMAGE_KEYS,
}
#: The attribute that identifies one record at each level.
LEVEL_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class Archive:
    """The cluster's shared store of received instances, in memory. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, Dataset] = {}

    def add(self, dataset: Dataset) -> None:
        """Keep ``dataset``; an instance sent again replaces the earlier copy, as a PACS would."""
        with self._lock:
            self._instances[str(dataset.get("SOPInstanceUID", ""))] = dataset

    def snapshot(self) -> list[Dataset]:
        with self._lock:
            return list(self._instances.values())

    def summary(self) -> dict[str, Any]:
        """Counts and study UIDs, for the status page."""
        instances = self.snapshot()
        studies = sorted({str(ds.get("StudyInstanceUID", "")) for ds in instances})
        patients = {str(ds.get("PatientID", "")) for ds in instances}
        return {
            "instances": len(instances),
            "studies": len(studies),
            "patients": len(patients),
            "study_uids": studies,
        }

    def records(self, level: str) -> list[Dataset]:
        """One record per patient, study, series or image: the attributes a C-FIND at ``level`` can match.

        Records carry the attributes of the levels above theirs too, so a query that names a study at
        SERIES level (the usual hierarchical query) matches on it.
        """
        groups: dict[str, list[Dataset]] = {}
        for ds in self.snapshot():
            groups.setdefault(str(ds.get(LEVEL_UNIQUE_KEY[level], "")), []).append(ds)
        return [_level_record(level, members) for members in groups.values()]


def _level_record(level: str, members: list[Dataset]) -> Dataset:
    from pydicom.dataset import Dataset

    first = members[0]
    record = Dataset()
    for keyword in ("SpecificCharacterSet", *LEVEL_KEYS[level]):
        if keyword in first:
            record[keyword] = copy.deepcopy(first[keyword])
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in members}
    if level == "PATIENT":
        record.NumberOfPatientRelatedStudies = len({str(ds.get("StudyInstanceUID", "")) for ds in members})
        record.NumberOfPatientRelatedSeries = len(series)
        record.NumberOfPatientRelatedInstances = len(members)
    elif level == "STUDY":
        record.ModalitiesInStudy = sorted({str(ds.Modality) for ds in members if "Modality" in ds})
        record.NumberOfStudyRelatedSeries = len(series)
        record.NumberOfStudyRelatedInstances = len(members)
    elif level == "SERIES":
        record.NumberOfSeriesRelatedInstances = len(members)
    return record


# -- C-FIND matching (PS3.4 C.2.2.2) -----------------------------------------------------------------

#: VRs whose values may use the wildcards * and ? (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: VRs with range matching, and the digits of their normalised form (PS3.4 C.2.2.2.5).
RANGE_WIDTH = {"DA": 8, "TM": 6, "DT": 14}
#: Keys that steer the query instead of matching anything.
CONTROL_KEYWORDS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"})


def _values(element: DataElement) -> list[str]:
    if element.is_empty:
        return []
    if element.VM > 1:
        return [str(v) for v in element.value]
    return [str(element.value)]


def _normalise(vr: str, text: str, fill: str) -> str:
    # Range bounds may be shorter than a full value ("0900" for 09:00:00): pad so string order is time order.
    digits = text.replace(":", "").split(".")[0]
    return (digits + fill * RANGE_WIDTH[vr])[: RANGE_WIDTH[vr]]


def _value_matches(vr: str, wanted: str, have: str) -> bool:
    if vr in RANGE_WIDTH and "-" in wanted:
        low, _, high = wanted.partition("-")
        value = _normalise(vr, have, "0")
        return (not low or value >= _normalise(vr, low, "0")) and (not high or value <= _normalise(vr, high, "9"))
    flags = re.IGNORECASE if vr == "PN" else 0  # PACS commonly match names regardless of case
    if vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
        return re.fullmatch(pattern, have, flags | re.DOTALL) is not None
    return wanted.casefold() == have.casefold() if flags else wanted == have


def _is_universal(element: DataElement) -> bool:
    """True when a key matches everything: empty, or a sequence whose single item has only such keys."""
    if element.VR == "SQ":
        return not element.value or all(_is_universal(e) for e in element.value[0])
    return element.is_empty


def matches(query: Dataset, record: Dataset) -> bool:
    """Whether ``record`` matches every key of the C-FIND identifier ``query``."""
    for element in query:
        if element.keyword in CONTROL_KEYWORDS or element.tag.element == 0 or _is_universal(element):
            continue
        if element.tag not in record:
            return False
        have = record[element.tag]
        if element.VR == "SQ":
            # Sequence matching (C.2.2.2.6): some item of the record must match the query's item.
            if not any(matches(element.value[0], item) for item in have.value):
                return False
            continue
        # Several values in the query (a UID list, or "CT\MR") mean any of them; a multi-valued record
        # attribute (ModalitiesInStudy "CT\MR") matches when any of its values does.
        if not any(_value_matches(element.VR, w, h) for w in _values(element) for h in _values(have)):
            return False
    return True


def answer(query: Dataset, record: Dataset) -> Dataset:
    """The C-FIND response identifier: the record's values for exactly the keys the query asked for."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    out = Dataset()
    if "SpecificCharacterSet" in record:
        out.SpecificCharacterSet = record.SpecificCharacterSet
    for element in query:
        if element.keyword in CONTROL_KEYWORDS:
            out[element.tag] = copy.deepcopy(element)
        elif element.VR == "SQ":
            items = record[element.tag].value if element.tag in record else []
            if element.value:
                wanted = element.value[0]
                chosen = [answer(wanted, item) for item in items if matches(wanted, item)]
            else:
                chosen = [copy.deepcopy(item) for item in items]
            out.add_new(element.tag, "SQ", Sequence(chosen))
        elif element.tag in record:
            out[element.tag] = copy.deepcopy(record[element.tag])
        else:
            out.add_new(element.tag, element.VR, None)
    return out


# -- the worklist ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    """One scheduled exam of the demo worklist (one requested procedure with one step)."""

    patient_name: str
    patient_id: str
    sex: str
    birth_date: str
    accession: str
    modality: str
    station_ae: str
    start_time: str
    description: str


#: The demo's worklist: two modalities, so a Modality filter visibly filters.
WORKLIST: tuple[Order, ...] = (
    Order("DOE^JANE", "MWL-0001", "F", "19700412", "ACC-1001", "CT", "CT01", "090000", "CT chest"),
    Order("ROE^RICHARD", "MWL-0002", "M", "19581103", "ACC-1002", "MR", "MR01", "101500", "MR brain"),
    Order("SMITH^ANNA", "MWL-0003", "F", "19891230", "ACC-1003", "CT", "CT02", "113000", "CT abdomen"),
)


def worklist_items(today: datetime.date | None = None) -> list[Dataset]:
    """The worklist as MWL records, scheduled for ``today``; the same on every node (one cluster, one RIS)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    day = (today or datetime.date.today()).strftime("%Y%m%d")
    items: list[Dataset] = []
    for number, order in enumerate(WORKLIST, 1):
        step = Dataset()
        step.Modality = order.modality
        step.ScheduledStationAETitle = order.station_ae
        step.ScheduledProcedureStepStartDate = day
        step.ScheduledProcedureStepStartTime = order.start_time
        step.ScheduledProcedureStepDescription = order.description
        step.ScheduledProcedureStepID = f"SPS-{number:04d}"
        step.ScheduledPerformingPhysicianName = ""
        item = Dataset()
        item.SpecificCharacterSet = "ISO_IR 100"
        item.PatientName = order.patient_name
        item.PatientID = order.patient_id
        item.PatientSex = order.sex
        item.PatientBirthDate = order.birth_date
        item.AccessionNumber = order.accession
        item.RequestedProcedureID = f"RP-{number:04d}"
        item.RequestedProcedureDescription = order.description
        # Stable across restarts and nodes, so one order has one study UID everywhere.
        item.StudyInstanceUID = generate_uid(entropy_srcs=["pacslb-demo-worklist", order.accession])
        item.ReferringPhysicianName = "WELBY^MARCUS"
        item.ScheduledProcedureStepSequence = Sequence([step])
        items.append(item)
    return items


# -- the demo study ----------------------------------------------------------------------------------


def write_demo_study(directory: Path, count: int = DEMO_STUDY_INSTANCES) -> str:
    """Write ``count`` CT images of one new study into ``directory``; return its Study Instance UID.

    The images are pydicom's bundled CT_small.dcm with new UIDs, so every demo run sends a study that
    no node has seen yet.
    """
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("CT_small.dcm", download=False)  # download=False: never touch the network
    if source is None:
        raise PacslbError("pydicom's test file CT_small.dcm is missing; reinstall pydicom")
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    template = dcmread(source)
    thickness = float(template.get("SliceThickness", 5.0))
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        sop_uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.PatientName = DEMO_PATIENT_NAME
        ds.PatientID = DEMO_PATIENT_ID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyDescription = "pacslb demo study"
        ds.SeriesDescription = "demo CT series"
        ds.AccessionNumber = "PACSLB-0001"
        ds.InstanceNumber = number
        # Consecutive slices, so a viewer that sorts by position shows a plausible stack.
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += (number - 1) * thickness
        ds.ImagePositionPatient = position
        ds.SliceLocation = position[2]
        ds.save_as(directory / f"CT{number:03d}.dcm", enforce_file_format=True)
    return study_uid
