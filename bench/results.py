"""Encoding cost of the node's result objects against bare highdicom calls for the same objects.

For a synthetic CT of ``--slices`` 512x512 slices and label maps with 2 and
with 20 segments (blocks spread over the middle 60 % of the slices), it times
each output kind against the highdicom call(s) that make the same objects:

- SEG: :func:`dicom_node.results.seg.build_seg` (checks, renumbering, segment
  descriptions, the highdicom call) against ``hd.seg.Segmentation`` with the
  same sources, array and segment descriptions;
- SR: :func:`dicom_node.results.sr.build_sr` against ``hd.sr.Comprehensive3DSR``
  of a TID 1500 report with one volumetric group per segment, referencing the SEG;
- SC: :func:`dicom_node.results.sc.iter_overlays` (window, draw, legend, encode)
  against one ``hd.sc.SCImage`` per slice with findings, handed an RGB array
  of the same size already drawn;
- all three, as the pipeline makes them, against the sum of the references.

It also prints SEG+SR and SEG+SR+SC against the bare Segmentation alone.
The figures are medians of ``--rounds`` runs.
Run: ``.venv/bin/python -m bench results [--slices 300] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.results.content import algorithm_identification
from dicom_node.results.identity import DEFAULT_UID_ROOT, derive_identity
from dicom_node.results.sc import iter_overlays
from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr
from inference.types import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_VOLUME,
    UCUM_ML,
    Code,
    Measurement,
    ModelCard,
    Prediction,
    SegmentSpec,
)


def _sources(count: int, size: int = 512) -> list[Dataset]:
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    pixels = (np.random.default_rng(0).normal(40, 30, (size, size))).astype(np.int16) + 1024
    out = []
    for z in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^CT", "BENCH", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "1200", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-256.0, -256.0, 1.5 * z]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 1.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024, 1, 40, 400
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def _prediction(depth: int, size: int, segments: int) -> Prediction:
    specs = tuple(
        SegmentSpec(i, f"Structure {i}", SCT_ANATOMICAL_STRUCTURE, Code("91723000", "SCT", "Anatomical structure"),
                    ((37 * i) % 256, (91 * i) % 256, (173 * i) % 256))
        for i in range(1, segments + 1)
    )
    labelmap = np.zeros((depth, size, size), np.uint8)
    z0, z1 = int(depth * 0.2), int(depth * 0.8)
    grid = int(np.ceil(np.sqrt(segments)))
    cell = size // (grid + 1)
    for i in range(segments):
        row, col = divmod(i, grid)
        y, x = (row + 1) * cell - cell // 2, (col + 1) * cell - cell // 2
        labelmap[z0:z1, y:y + cell * 3 // 4, x:x + cell * 3 // 4] = i + 1
    card = ModelCard(name="bench", version="1", segments=specs)
    measurements = {s.label: (Measurement(SCT_VOLUME, 1.0, UCUM_ML),) for s in specs}
    return Prediction(card, labelmap, measurements=measurements)


def _median(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bare_sr(sources: list[Dataset], seg: Dataset, prediction: Prediction, algorithm: object,
             uid: str) -> object:
    """A TID 1500 Comprehensive 3D SR with one volumetric group per segment of ``seg``, nothing else."""
    source_series = hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=pydicom.uid.generate_uid(), identifier=spec.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=spec.label, source_series=source_series),
            finding_type=hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"), value=m.value,
                                            unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"))
                          for m in prediction.measurements[spec.label]],
        )
        for spec in prediction.card.segments
    ]
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=pydicom.uid.generate_uid())))
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=hd.sr.CodedConcept("77477000", "SCT", "CT"),
        imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg], content=report, series_instance_uid=pydicom.uid.generate_uid(), series_number=9902,
        sop_instance_uid=uid, instance_number=1, manufacturer="bench", is_complete=True)


def _bare_overlays(sources: list[Dataset], labelmap: np.ndarray, series_uid: str) -> list[object]:
    """One ``hd.sc.SCImage`` per slice with findings, from an RGB array that is already drawn."""
    rows, columns = labelmap.shape[1:]
    rgb = np.zeros((rows + 48, columns, 3), np.uint8)
    images = []
    for z in np.flatnonzero(labelmap.reshape(labelmap.shape[0], -1).any(axis=1)):
        source = sources[z]
        images.append(hd.sc.SCImage(
            pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT, study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_uid, series_number=9903, sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=int(z) + 1, manufacturer="bench", patient_id=source.PatientID,
            patient_name=source.PatientName, patient_birth_date=source.PatientBirthDate,
            patient_sex=source.PatientSex, accession_number=source.AccessionNumber, study_id=source.StudyID,
            study_date=source.StudyDate, study_time=source.StudyTime,
            referring_physician_name=source.ReferringPhysicianName, pixel_spacing=(0.8, 0.8),
            patient_orientation=("L", "P")))
    return images


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench results", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # highdicom's person-name hints
    size = 512
    sources = _sources(args.slices, size)
    series = sources[0].SeriesInstanceUID

    def ident(kind: str, number: int) -> object:
        return derive_identity(DEFAULT_UID_ROOT, series, "bench", "1", kind, number, f"AI {kind}")

    print(f"{args.slices} slices of {size}x{size}, median of {args.rounds} rounds")
    for segments in (2, 20):
        prediction = _prediction(args.slices, size, segments)
        card = prediction.card
        algorithm = algorithm_identification(card)
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=s.label, segment_label=s.name,
                segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
                segmented_property_type=hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
            for s in card.segments
        ]
        seg_id, sr_id, sc_id = ident("seg", 9901), ident("sr", 9902), ident("sc", 9903)

        def bare_seg() -> hd.seg.Segmentation:
            return hd.seg.Segmentation(
                source_images=sources, pixel_array=prediction.labelmap, segmentation_type="BINARY",
                segment_descriptions=descriptions, series_instance_uid=seg_id.series_instance_uid,  # type: ignore[attr-defined]
                series_number=9901, sop_instance_uid=seg_id.sop_instance_uid, instance_number=1,  # type: ignore[attr-defined]
                manufacturer="bench", manufacturer_model_name="bench", software_versions="1",
                device_serial_number="1", omit_empty_frames=True)

        reference_seg = bare_seg()
        node_seg = build_seg(prediction, sources, seg_id)  # type: ignore[arg-type]
        sr_algorithm = hd.sr.AlgorithmIdentification(name=card.name, version=card.version)
        overlay_count = int(np.count_nonzero(prediction.labelmap.reshape(args.slices, -1).any(axis=1)))  # type: ignore[union-attr]

        def bare_sr() -> object:
            return _bare_sr(sources, reference_seg, prediction, sr_algorithm, sr_id.sop_instance_uid)  # type: ignore[attr-defined]

        def node_sr() -> object:
            return build_sr(prediction, sources, sr_id, seg=node_seg.dataset,  # type: ignore[arg-type]
                            segment_numbers=node_seg.segment_numbers)

        def bare_sc() -> object:
            return _bare_overlays(sources, prediction.labelmap, sc_id.series_instance_uid)  # type: ignore[arg-type,attr-defined]

        def node_sc() -> object:
            return list(iter_overlays(prediction, sources, sc_id))  # type: ignore[arg-type]

        def node_seg_sr() -> object:
            result = build_seg(prediction, sources, seg_id)  # type: ignore[arg-type]
            return build_sr(prediction, sources, sr_id, seg=result.dataset,  # type: ignore[arg-type]
                            segment_numbers=result.segment_numbers)

        def node_all() -> object:
            node_seg_sr()
            return list(iter_overlays(prediction, sources, sc_id))  # type: ignore[arg-type]

        times = {name: _median(fn, args.rounds) for name, fn in (
            ("bare SEG", bare_seg), ("node SEG", lambda: build_seg(prediction, sources, seg_id)),  # type: ignore[arg-type]
            ("bare SR", bare_sr), ("node SR", node_sr), ("bare SC", bare_sc), ("node SC", node_sc),
            ("node SEG+SR", node_seg_sr), ("node all", node_all))}
        bare_all = times["bare SEG"] + times["bare SR"] + times["bare SC"]
        print(f"-- {segments} segments, {overlay_count} overlay images")
        print(f"   {'output':<22} {'highdicom':>9} {'node':>9}   ratio")
        for label, bare, node in (("SEG", "bare SEG", "node SEG"), ("SR", "bare SR", "node SR"),
                                  ("SC overlay series", "bare SC", "node SC")):
            print(f"   {label:<22} {times[bare]:8.2f}s {times[node]:8.2f}s   {times[node] / times[bare]:5.2f}x")
        print(f"   {'SEG+SR+SC':<22} {bare_all:8.2f}s {times['node all']:8.2f}s   {times['node all'] / bare_all:5.2f}x")
        seg_only = times["bare SEG"]
        print(f"   against the bare Segmentation alone: SEG+SR {times['node SEG+SR'] / seg_only:.2f}x, "
              f"SEG+SR+SC {times['node all'] / seg_only:.2f}x")
    return 0
