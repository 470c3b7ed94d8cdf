"""Encoding cost of the node's result objects against a bare highdicom Segmentation call.

For a synthetic CT of ``--slices`` 512x512 slices and label maps with 2 and
with 20 segments (blocks spread over the middle 60 % of the slices), it times:

- ``highdicom``: ``hd.seg.Segmentation(...)`` with the same sources, array and
  segment descriptions, nothing else (the reference);
- ``SEG``: :func:`dicom_node.results.seg.build_seg` (checks, renumbering,
  descriptions, the same highdicom call);
- ``SEG+SR``: the SEG and :func:`dicom_node.results.sr.build_sr`;
- ``SEG+SR+SC``: also the overlay series (:func:`~dicom_node.results.sc.build_overlays`).

It prints the median of ``--rounds`` runs and the ratios against the reference.
Run: ``.venv/bin/python -m bench results [--slices 300] [--rounds 3]``.
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

from dicom_node.results.identity import DEFAULT_UID_ROOT, derive_identity
from dicom_node.results.sc import build_overlays
from dicom_node.results.seg import algorithm_identification, build_seg
from dicom_node.results.sr import build_sr
from inference.types import SCT_ANATOMICAL_STRUCTURE, SCT_VOLUME, UCUM_ML, Code, Measurement, ModelCard, Prediction, SegmentSpec


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench results", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
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

        def bare() -> object:
            return hd.seg.Segmentation(
                source_images=sources, pixel_array=prediction.labelmap, segmentation_type="BINARY",
                segment_descriptions=descriptions, series_instance_uid=seg_id.series_instance_uid,  # type: ignore[attr-defined]
                series_number=9901, sop_instance_uid=seg_id.sop_instance_uid, instance_number=1,  # type: ignore[attr-defined]
                manufacturer="bench", manufacturer_model_name="bench", software_versions="1",
                device_serial_number="1", omit_empty_frames=True)

        def seg() -> object:
            return build_seg(prediction, sources, seg_id)  # type: ignore[arg-type]

        def seg_sr() -> object:
            result = build_seg(prediction, sources, seg_id)  # type: ignore[arg-type]
            return build_sr(prediction, sources, sr_id, seg=result.dataset,  # type: ignore[arg-type]
                            segment_numbers=result.segment_numbers)

        def seg_sr_sc() -> object:
            seg_sr()
            return build_overlays(prediction, sources, sc_id)  # type: ignore[arg-type]

        reference = _median(bare, args.rounds)
        print(f"-- {segments} segments")
        print(f"   highdicom Segmentation  {reference:8.2f} s")
        for name, fn in (("SEG", seg), ("SEG+SR", seg_sr), ("SEG+SR+SC", seg_sr_sc)):
            seconds = _median(fn, args.rounds)
            print(f"   {name:<23} {seconds:8.2f} s   ratio {seconds / reference:5.2f}x")
    return 0
