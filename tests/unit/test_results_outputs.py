"""Overlay (secondary capture), label-map SEG, empty-segment policy, provenance, PDF and routing.

Every object is checked with dciodvfy and read back (highdicom or pydicom).
"""

from __future__ import annotations

import io
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.errors import InvalidUIDError, ResultError
from dicom_node.results.identity import DEFAULT_DEVICE_SERIAL_NUMBER, SOFTWARE_VERSION, software_versions
from dicom_node.results.overlay import CT_DEFAULT_WINDOW, OverlayStyle, window_of
from dicom_node.results.pdf import build_pdf, key_slices
from dicom_node.results.routing import Route, files_for, plan_outputs
from dicom_node.results.sc import _sc_image, iter_overlays, overlay_uid
from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr
from dicom_node.settings import load_settings_text
from dicom_node.spool import Spool
from inference.types import SCT_VOLUME, UCUM_ML, Measurement, Prediction
from tests.realdata import real_ct_slices
from tests.tools import require_tool
from tests.unit.test_results import (
    CARD,
    _assert_dciodvfy_clean,
    _ct_labelmap,
    _dciodvfy,
    _identity,
    _roundtrip_seg,
    _roundtrip_sr,
    _slice_position,
    _synthetic_ct,
)

HASH = "sha256:" + "0123456789abcdef" * 4
HASHED = replace(CARD, model_hash=HASH)
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


@pytest.fixture(scope="module")
def ct_slices() -> list[Dataset]:
    return sorted(real_ct_slices(3), key=_slice_position)


def _prediction(labelmap: np.ndarray | None = None) -> Prediction:
    return Prediction(
        HASHED,
        _ct_labelmap() if labelmap is None else labelmap,
        measurements={1: (Measurement(SCT_VOLUME, 12.25, UCUM_ML),)},
        findings=("spleen borders uncertain",),
    )


def _save(ds: Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


# --------------------------------------------------------------------------- overlay


@pytest.fixture(scope="module")
def overlays(ct_slices: list[Dataset]) -> list[Dataset]:
    return list(iter_overlays(_prediction(), ct_slices, _identity(ct_slices, "sc", HASHED, 903)))


def test_overlay_has_one_image_per_slice_with_findings(ct_slices: list[Dataset]) -> None:
    labelmap = _ct_labelmap()
    labelmap[2] = 0  # slice 2 has no finding: no image for it
    images = list(iter_overlays(_prediction(labelmap), ct_slices, _identity(ct_slices, "sc", HASHED)))
    assert [int(i.InstanceNumber) for i in images] == [1, 2]
    referenced = [i.SourceImageSequence[0].ReferencedSOPInstanceUID for i in images]
    assert referenced == [ct_slices[0].SOPInstanceUID, ct_slices[1].SOPInstanceUID]


def test_overlay_identity_is_deterministic_per_source_slice(
    ct_slices: list[Dataset], overlays: list[Dataset]
) -> None:
    again = list(iter_overlays(_prediction(), ct_slices, _identity(ct_slices, "sc", HASHED, 903)))
    assert [i.SOPInstanceUID for i in again] == [i.SOPInstanceUID for i in overlays]
    identity = _identity(ct_slices, "sc", HASHED, 903)
    assert {i.SeriesInstanceUID for i in overlays} == {identity.series_instance_uid}
    assert overlays[0].SOPInstanceUID == overlay_uid(identity, ct_slices[0], 0)
    assert len({i.SOPInstanceUID for i in overlays}) == len(overlays)
    other_version = list(iter_overlays(
        Prediction(replace(HASHED, version="9"), _ct_labelmap()), ct_slices,
        _identity(ct_slices, "sc", replace(HASHED, version="9"), 903),
    ))
    assert not {i.SOPInstanceUID for i in other_version} & {i.SOPInstanceUID for i in overlays}


def test_overlay_is_in_the_source_study_with_provenance(
    ct_slices: list[Dataset], overlays: list[Dataset]
) -> None:
    image = pydicom.dcmread(_save(overlays[0]))
    source = ct_slices[0]
    assert image.StudyInstanceUID == source.StudyInstanceUID
    assert image.PatientID == source.PatientID
    assert image.SeriesNumber == 903 and image.SeriesDescription == "AI SC"
    assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
    assert image.BurnedInAnnotation == "YES"
    assert list(image.SoftwareVersions) == [SOFTWARE_VERSION, "abdomen-ai 1.4.2", HASH[:63]]
    assert HASH in image.DerivationDescription
    assert [float(v) for v in image.PixelSpacing] == [float(v) for v in source.PixelSpacing]


def test_overlay_pixels_show_segments_in_their_colours(
    ct_slices: list[Dataset], overlays: list[Dataset], tmp_path: Path
) -> None:
    rgb = pydicom.dcmread(_save(overlays[1])).pixel_array  # slice 1 has liver and spleen
    Image.fromarray(rgb).save(tmp_path / "overlay.png")
    rows = int(ct_slices[1].Rows)
    assert rgb.shape[0] > rows and rgb.shape[1] == int(ct_slices[1].Columns)  # legend strip below
    # Contours are drawn in the exact card colour, fills are tinted towards it.
    assert tuple(rgb[200, 150]) == (200, 100, 50)  # liver top edge
    assert tuple(rgb[300, 400]) == (0, 255, 0)  # spleen top edge
    inside_spleen = rgb[340, 400].astype(int)
    assert inside_spleen[1] > inside_spleen[0] + 50 and inside_spleen[1] > inside_spleen[2] + 50
    outside = rgb[100, 30]
    assert outside[0] == outside[1] == outside[2]  # untouched grey
    strip = rgb[rows:]
    assert (np.all(strip == (255, 255, 0), axis=2)).any()  # banner text
    assert (np.all(strip == (0, 255, 0), axis=2)).sum() > 50  # spleen swatch in the legend


def test_overlay_window_comes_from_the_source_or_a_ct_default(ct_slices: list[Dataset]) -> None:
    source = Dataset()
    source.Modality = "CT"
    assert window_of(source, np.zeros((2, 2))) == CT_DEFAULT_WINDOW
    source.WindowCenter, source.WindowWidth = ["-600", "40"], ["1500", "400"]
    assert window_of(source, np.zeros((2, 2))) == (-600.0, 1500.0)
    mr = Dataset()
    mr.Modality = "MR"
    center, width = window_of(mr, np.arange(100, dtype=float).reshape(10, 10))
    assert 40 < center < 60 and 90 < width < 100


def test_overlay_rejects_bad_input(ct_slices: list[Dataset]) -> None:
    identity = _identity(ct_slices, "sc")
    with pytest.raises(ResultError, match="3 source images"):
        list(iter_overlays(_prediction(np.ones((2, 512, 512), np.uint8)), ct_slices, identity))
    with pytest.raises(ResultError, match="does not declare"):
        list(iter_overlays(_prediction(np.full((3, 512, 512), 7, np.uint8)), ct_slices, identity))
    with pytest.raises(ResultError, match="banner"):
        OverlayStyle(banner="\u00e9t\u00e9")
    with pytest.raises(ResultError, match="opacity"):
        OverlayStyle(fill_opacity=1.5)
    assert list(iter_overlays(_prediction(np.zeros((3, 512, 512), np.uint8)), ct_slices, identity)) == []


def test_overlay_of_a_multiframe_source() -> None:
    source = _synthetic_ct(1, 32, 32)[0]
    frames = np.stack([np.full((32, 32), 10 * i, np.int16) for i in range(4)])
    source.NumberOfFrames = 4
    source.PixelData = frames.tobytes()
    labelmap = np.zeros((4, 32, 32), np.uint8)
    labelmap[2, 8:20, 8:20] = 2
    images = list(iter_overlays(Prediction(CARD, labelmap), [source], _identity([source], "sc")))
    assert len(images) == 1 and int(images[0].InstanceNumber) == 3
    assert images[0].SourceImageSequence[0].ReferencedFrameNumber == 3
    assert tuple(images[0].pixel_array[8, 10]) == (0, 255, 0)


def test_dciodvfy_overlay(overlays: list[Dataset], tmp_path: Path) -> None:
    # The first image is built by highdicom, the others are copies of its header.
    _assert_dciodvfy_clean(overlays[0], tmp_path / "sc.dcm", "SCImage")
    _assert_dciodvfy_clean(overlays[-1], tmp_path / "sc-copy.dcm", "SCImage")


def test_overlay_copies_equal_images_built_by_highdicom(ct_slices: list[Dataset], overlays: list[Dataset]) -> None:
    identity = _identity(ct_slices, "sc", HASHED, 903)
    assert len(overlays) == 3
    for z, image in enumerate(overlays):
        rgb = image.pixel_array
        built = _sc_image(ct_slices[z], 0, z, rgb, identity, HASHED.name, software_versions(HASHED),
                          DEFAULT_DEVICE_SERIAL_NUMBER, HASH)
        copied, reference = pydicom.dcmread(_save(image)), pydicom.dcmread(_save(built))
        for ds in (copied, reference):
            del ds.ContributingEquipmentSequence[0].ContributionDateTime
        # highdicom stamps the time of each call; a copy keeps its template's (same series, same run).
        moments = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
                   "DateOfSecondaryCapture", "TimeOfSecondaryCapture"}
        assert {e.keyword for e in copied} == {e.keyword for e in reference}
        for element in reference:
            if element.keyword not in moments:
                assert copied[element.tag] == element, element.keyword
        assert copied.file_meta == reference.file_meta


def test_overlay_copies_share_nothing(overlays: list[Dataset]) -> None:
    first, second = overlays[1], overlays[2]
    second.ContributingEquipmentSequence[0].Manufacturer = "changed"
    second.file_meta.ImplementationVersionName = "changed"
    assert first.ContributingEquipmentSequence[0].Manufacturer != "changed"
    assert overlays[0].ContributingEquipmentSequence[0].Manufacturer != "changed"
    assert first.file_meta.ImplementationVersionName != "changed"


def test_overlay_header_follows_each_source(ct_slices: list[Dataset]) -> None:
    sources = list(ct_slices)
    sources[2] = Dataset(dict(ct_slices[2].items()))
    sources[2].file_meta = ct_slices[2].file_meta
    sources[2].PixelSpacing = [0.5, 0.5]
    images = list(iter_overlays(_prediction(), sources, _identity(sources, "sc", HASHED, 903)))
    assert [float(v) for v in images[2].PixelSpacing] == [0.5, 0.5]
    assert [float(v) for v in images[1].PixelSpacing] == [float(v) for v in ct_slices[1].PixelSpacing]


# --------------------------------------------------------------------------- SEG options


def test_labelmap_seg_round_trip(ct_slices: list[Dataset]) -> None:
    result = build_seg(_prediction(), ct_slices, _identity(ct_slices, "seg"), segmentation_type="LABELMAP")
    seg = _roundtrip_seg(result.dataset)
    assert seg.SOPClassUID == LABEL_MAP_SEG
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    expected = _ct_labelmap()
    for label, number in result.segment_numbers.items():
        for z, source in enumerate(ct_slices):
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[number],
                combine_segments=False, skip_overlap_checks=True,
            )[0, :, :, 0]
            assert np.array_equal(mask > 0, expected[z] == label), (label, z)
    assert seg.get_segment_description(1).segment_label == "Liver"
    algorithm = seg.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0]
    assert HASH in algorithm.AlgorithmParameters


def test_labelmap_seg_and_dciodvfy(ct_slices: list[Dataset], tmp_path: Path) -> None:
    """dciodvfy of dicom3tools 1.00~20220618 predates Label Map Segmentation Storage (2024).

    It says so ("Information Object Not found") and checks no module.  The
    same object relabelled as Segmentation Storage is then checked module by
    module: the only errors allowed are the differences the label-map IOD makes
    (Segmentation Type LABELMAP, background segment 0, no per-frame Segment
    Identification).
    """
    tool = _dciodvfy()
    result = build_seg(_prediction(), ct_slices, _identity(ct_slices, "seg"), segmentation_type="labelmap")
    path = tmp_path / "labelmap.dcm"
    result.dataset.save_as(path, enforce_file_format=True)
    output = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120).stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    if "Error - Information Object Not found" not in errors:
        _assert_dciodvfy_clean(result.dataset, tmp_path / "labelmap2.dcm", "Segmentation")
        return  # a dciodvfy that knows the label-map IOD validated it fully
    relabelled = pydicom.dcmread(path)
    relabelled.SOPClassUID = SegmentationStorage
    relabelled.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    relabelled.save_as(tmp_path / "relabelled.dcm", enforce_file_format=True)
    run = subprocess.run([tool, str(tmp_path / "relabelled.dcm")], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert "Segmentation" in output.splitlines()
    errors = [line for line in output.splitlines() if "Error" in line]
    # Exactly what the label-map IOD changes: its Segmentation Type, the background
    # segment 0, and no per-frame Segment Identification (the pixel values are segment numbers).
    allowed = re.compile(
        r"Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>$"
        r"|SegmentNumber not monotonically increasing .* SegmentNumber of 0$"
        r"|Value is zero for value 1 of attribute <Segment Number>$"
        r"|Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> Module=<SegmentationMacro>$"
    )
    assert errors, "the relabelled label map should differ from a binary SEG"
    assert [e for e in errors if not allowed.search(e)] == [], output


def test_empty_segments_kept_when_configured(ct_slices: list[Dataset], tmp_path: Path) -> None:
    result = build_seg(_prediction(), ct_slices, _identity(ct_slices, "seg"), omit_empty_segments=False)
    seg = _roundtrip_seg(result.dataset)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "Liver", "Spleen", "Right kidney"]
    _assert_dciodvfy_clean(result.dataset, tmp_path / "keep.dcm", "Segmentation")


def test_unknown_segmentation_type_is_refused(ct_slices: list[Dataset]) -> None:
    for value in ("FRACTIONAL", "bitmap"):
        with pytest.raises(ResultError, match="BINARY|label maps"):
            build_seg(_prediction(), ct_slices, _identity(ct_slices, "seg"), segmentation_type=value)


def test_model_hash_recorded_in_seg_and_sr(ct_slices: list[Dataset]) -> None:
    result = build_seg(_prediction(), ct_slices, _identity(ct_slices, "seg"))
    sr = build_sr(_prediction(), ct_slices, _identity(ct_slices, "sr", HASHED), seg=result.dataset,
                  segment_numbers=result.segment_numbers)
    for ds in (_roundtrip_seg(result.dataset), _roundtrip_sr(sr)):
        assert list(ds.SoftwareVersions) == [SOFTWARE_VERSION, "abdomen-ai 1.4.2", HASH[:63]]
    assert f"model_hash={HASH}" in _text_values(sr)


def _text_values(ds: Dataset) -> list[str]:
    found = [str(ds.TextValue)] if "TextValue" in ds else []
    for item in ds.get("ContentSequence", []):
        found.extend(_text_values(item))
    return found


# --------------------------------------------------------------------------- PDF


def test_pdf_summary(ct_slices: list[Dataset], tmp_path: Path) -> None:
    ds = build_pdf(_prediction(), ct_slices, _identity(ct_slices, "pdf", HASHED, 904))
    back = pydicom.dcmread(_save(ds))
    document = bytes(back.EncapsulatedDocument)[: int(back.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
    assert back.StudyInstanceUID == ct_slices[0].StudyInstanceUID and back.Modality == "DOC"
    assert back.SeriesNumber == 904 and HASH[:63] in list(back.SoftwareVersions)
    assert key_slices(_prediction()) == [0, 1]
    referenced = [item.ReferencedSOPInstanceUID for item in back.SourceInstanceSequence]
    assert referenced == [ct_slices[0].SOPInstanceUID, ct_slices[1].SOPInstanceUID]
    assert str(ct_slices[0].PatientID).encode() not in document
    _assert_dciodvfy_clean(ds, tmp_path / "pdf.dcm", "EncapsulatedPDF")


def test_pdf_of_a_classifier_has_no_key_images(tmp_path: Path) -> None:
    source = _synthetic_ct(2)
    ds = build_pdf(Prediction(replace(CARD, segments=()), findings=("nothing",)), source, _identity(source, "pdf"))
    assert "SourceInstanceSequence" not in ds
    _assert_dciodvfy_clean(ds, tmp_path / "pdf_cls.dcm", "EncapsulatedPDF")


def _rendered_pages(document: bytes, tmp: Path) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
    """Every page of a PDF as a picture (poppler's pdftoppm at 100 dpi) and its size in points (pdfinfo)."""
    tool, info = require_tool("pdftoppm"), require_tool("pdfinfo")
    path = tmp / "summary.pdf"
    path.write_bytes(document)
    subprocess.run([tool, "-r", "100", "-png", str(path), str(tmp / "page")], check=True, timeout=120)
    pages = [np.asarray(Image.open(p).convert("L")) for p in sorted(tmp.glob("page*.png"))]
    text = subprocess.run([info, "-f", "1", "-l", "999", str(path)], capture_output=True, text=True,
                          check=True).stdout
    sizes = [(float(w), float(h)) for w, h in re.findall(r"Page\s+\d+ size:\s+([\d.]+) x ([\d.]+) pts", text)]
    return pages, sizes


@pytest.mark.parametrize(("paper", "points"), [("a4", (595.0, 842.0)), ("letter", (612.0, 792.0))])
def test_pdf_text_stays_on_the_page_and_units_read_as_people_write_them(
        ct_slices: list[Dataset], tmp_path: Path, paper: str, points: tuple[float, float]) -> None:
    """The lungs' long measurement rows wrap inside the page; every page, looked at as a picture, has blank margins."""
    from dicom_node.results.pdf import _table_rows, unit_symbol
    from inference.types import SCT_MEAN, UCUM_HU, UCUM_PERCENT, Code

    laa = Code("LAA950", "99DCMNODE", "Percent low attenuation area below -950 HU")
    prediction = replace(_prediction(), measurements={
        1: (Measurement(SCT_VOLUME, 2847.25, UCUM_ML), Measurement(SCT_MEAN, -847.39, UCUM_HU),
            Measurement(laa, 4.17, UCUM_PERCENT)),
        2: (Measurement(SCT_VOLUME, 12.5, UCUM_ML),)},
        findings=("a very long free-text finding " * 12 + "Averyveryverylongwordwithoutanyspaceatallthatmustbecut" * 3,))
    rows = dict(_table_rows(prediction))
    assert "[hnsf'U]" not in " ".join(rows.values()) and "Mean -847.4 HU" in rows["Liver"]
    assert unit_symbol("[hnsf'U]") == "HU" and unit_symbol("ml") == "ml" and unit_symbol("kg") == "kg"
    ds = build_pdf(prediction, ct_slices, _identity(ct_slices, "pdf", HASHED, 904), paper=paper)
    document = bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]
    pages, sizes = _rendered_pages(document, tmp_path)
    assert pages and len(sizes) == len(pages)
    for (width, height), page in zip(sizes, pages, strict=True):
        assert (round(width), round(height)) == (round(points[0]), round(points[1]))
        rows_px, cols_px = page.shape
        margin = int(0.3 * 100)  # 0.3 inch at 100 dpi: the page margin is 0.4 inch
        edges = [page[:, cols_px - margin:], page[:, :margin], page[rows_px - margin:, :], page[:margin, :]]
        assert all(int(edge.min()) > 200 for edge in edges), "ink in the page margin: text runs off the page"
    assert int(pages[0][: pages[0].shape[0] // 3].min()) < 100  # and there is text on the page

    # Nothing is cut: the long finding wraps onto more lines (text bands on the page) instead of ending at the edge.
    short = build_pdf(replace(prediction, findings=("short",)), ct_slices, _identity(ct_slices, "pdf", HASHED, 904),
                      paper=paper)
    (tmp_path / "short").mkdir()
    short_pages, _ = _rendered_pages(bytes(short.EncapsulatedDocument)[: int(short.EncapsulatedDocumentLength)],
                                     tmp_path / "short")

    def bands(page: np.ndarray) -> int:
        inked = (page < 128).any(axis=1)
        return int(np.count_nonzero(inked[1:] & ~inked[:-1]))

    assert bands(pages[0]) >= bands(short_pages[0]) + 4


def test_wrap_keeps_every_character_within_the_width() -> None:
    from dicom_node.results.overlay import load_font
    from dicom_node.results.pdf import wrap

    font = load_font(21)
    text = "Percent low attenuation area below -950 HU 4.17 %; " * 5 + "X" * 300
    lines = wrap(text, font, 400)
    assert all(font.getlength(line) <= 400 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


# --------------------------------------------------------------------------- routing and config


def test_plan_outputs_per_destination() -> None:
    settings = load_settings_text(
        "destinations:\n"
        "  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        "  old: {ae_title: OLD, host: 127.0.0.1, port: 105, outputs: [sc, sr]}\n"
        "  strict: {ae_title: S, host: 127.0.0.1, port: 106, seg_fallback: none}\n"
    )
    produce, routes = plan_outputs(["seg", "sr"], ["pacs", "old", "strict"], settings.destinations)
    assert produce == ("seg", "sr", "sc")
    assert routes["pacs"] == Route(("seg", "sr"), "sc")
    assert routes["old"] == Route(("sr", "sc"), None)
    assert routes["strict"] == Route(("seg", "sr"), None)
    assert plan_outputs(["sr"], [], settings.destinations) == (("sr",), {})
    # The overlay is produced up front only for a destination known to refuse the SEG.
    assert plan_outputs(["seg", "sr"], ["pacs"], settings.destinations)[0] == ("seg", "sr")
    assert plan_outputs(["seg", "sr"], ["pacs"], settings.destinations, {"pacs"})[0] == ("seg", "sr", "sc")
    assert plan_outputs(["seg", "sr"], ["strict"], settings.destinations, {"strict"})[0] == ("seg", "sr")
    objects = [("seg", "a/seg.dcm"), ("sr", "a/sr.dcm"), ("sc", "a/sc-00000.dcm")]
    assert files_for(routes["pacs"], objects) == (["a/seg.dcm", "a/sr.dcm"], ["a/sc-00000.dcm"])
    assert files_for(routes["old"], objects) == (["a/sr.dcm", "a/sc-00000.dcm"], [])
    assert files_for(routes["pacs"], objects[1:]) == (["a/sr.dcm"], [])  # no SEG made: no fallback
    assert Route.from_payload(routes["pacs"].as_payload()) == routes["pacs"]


def test_series_description_says_the_result() -> None:
    from dicom_node.results.content import result_words
    from dicom_node.settings.outputs import OutputSeriesSettings
    from inference.types import Classification, Detection, ModelCard, Prediction, Task

    classifier = ModelCard("triage", "1", task=Task.CLASSIFICATION, classes=("Nodule present", "Effusion"))
    positive = Prediction(classifier, classifications=(Classification("Nodule present", 0.834, True),
                                                       Classification("Effusion", 0.2, False)))
    negative = Prediction(classifier, classifications=(Classification("Nodule present", 0.1, False),))
    detector = ModelCard("boxes", "1", task=Task.DETECTION, classes=("Lung nodule", "Mass"))
    boxes = Prediction(detector, detections=tuple(Detection(label, 0.9, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
                                                  for label in (0, 0, 1)))
    assert result_words(positive) == "Nodule present 0.83"
    assert result_words(negative) == "negative"
    assert result_words(boxes) == "2 Lung nodule, 1 Mass"
    assert result_words(Prediction(detector)) == "none found"
    assert result_words(Prediction(ModelCard("seg", "1"))) == ""
    conf = OutputSeriesSettings(series_number=9902, series_description="{result} - AI Report {model}")
    assert conf.description_for("triage", result_words(positive)) == "Nodule present 0.83 - AI Report triage"
    assert conf.description_for("lungs") == "AI Report lungs"  # nothing to say: no dangling separator
    assert OutputSeriesSettings(series_number=1, series_description="AI: {result}").description_for("m") == "AI"
    assert len(conf.description_for("m", "x" * 100)) == 64
    with pytest.raises(ValueError, match="placeholders"):
        OutputSeriesSettings(series_number=1, series_description="{patient}")


def test_sr_form_per_destination() -> None:
    """A destination with sr_form: measurements gets that SR (an object of its own), the others the viewer's."""
    settings = load_settings_text(
        "destinations:\n"
        "  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        "  registry: {type: dicomweb, url: 'https://ai.example.org/dicom-web', sr_form: measurements}\n"
        "  archive: {ae_title: ARC, host: 127.0.0.1, port: 105, sr_form: measurements, outputs: [seg]}\n"
    )
    produce, routes = plan_outputs(["seg", "sr"], ["pacs", "registry", "archive"], settings.destinations)
    assert produce == ("seg", "sr", "sr_measurements")
    assert routes["pacs"].outputs == ("seg", "sr")
    assert routes["registry"].outputs == ("seg", "sr_measurements")
    assert routes["archive"].outputs == ("seg",)  # no SR asked for: none in either form
    assert plan_outputs(["seg", "sr"], ["registry"], settings.destinations)[0] == ("seg", "sr_measurements")
    objects = [("seg", "a/seg.dcm"), ("sr", "a/sr.dcm"), ("sr_measurements", "a/sr_measurements.dcm")]
    assert files_for(routes["pacs"], objects)[0] == ["a/seg.dcm", "a/sr.dcm"]
    assert files_for(routes["registry"], objects)[0] == ["a/seg.dcm", "a/sr_measurements.dcm"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("outputs: {sc: {series_number: 9901, series_description: x}}", "seg and sc"),
        ("outputs: {seg_type: fractional}", "seg_type"),
        ("outputs: {empty_segments: maybe}", "empty_segments"),
        ("outputs: {banner: ''}", "banner"),
        ("outputs: {fill_opacity: 2}", "fill_opacity"),
        ("destinations: {p: {ae_title: A, host: h, port: 1, outputs: [seg, seg]}}", "duplicate"),
        ("destinations: {p: {ae_title: A, host: h, port: 1, outputs: [png]}}", "outputs"),
        ("destinations: {p: {ae_title: A, host: h, port: 1, seg_fallback: pdf}}", "seg_fallback"),
        ("destinations: {p: {ae_title: A, host: h, port: 1, sr_form: ohif}}", "sr_form"),
    ],
)
def test_output_settings_are_validated(text: str, message: str) -> None:
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_settings_text(text)


def test_spool_result_part_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.result_part_path("1.2.3", "lungs", "sc", 7)
    assert path.name == "sc-00007.dcm" and path.parent == spool.result_path("1.2.3", "lungs", "sc").parent
    with pytest.raises(InvalidUIDError):
        spool.result_part_path("1.2.3", "lungs", "sc", -1)


# --------------------------------------------------------------------------- fast paths


def _reference_overlay_pixels(gray: np.ndarray, labels: np.ndarray, segments: list, opacity: float) -> np.ndarray:
    """Overlay rows drawn on the whole slice, pixel by pixel (no bounding boxes, no tables)."""
    rgb = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    width = max(1, min(gray.shape) // 256)
    alpha = np.float32(opacity)
    for spec in segments:
        mask = labels == spec.label
        color = np.asarray(spec.color, dtype=np.float32)
        rgb[mask] = rgb[mask] * (1 - alpha) + color * alpha
        inner = mask.copy()
        for _ in range(width):
            padded = np.pad(inner, 1, constant_values=False)
            inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rgb[mask & ~inner] = color
    return rgb.round().astype(np.uint8)


@pytest.mark.parametrize("opacity", [0.0, 0.35, 1.0])
def test_overlay_segments_drawn_in_their_boxes_match_whole_slice_drawing(opacity: float) -> None:
    from dicom_node.results.overlay import render_overlay, windowed_gray

    rng = np.random.default_rng(7)
    values = rng.normal(40, 200, (512, 512)).astype(np.float32)
    labels = np.zeros((512, 512), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    for label, (cy, cx, radius) in enumerate([(0, 0, 90), (256, 256, 120), (300, 300, 60), (511, 400, 40)], 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = label  # touching edges and each other
    labels[:, 508:] = 2
    labels[100, 100] = 3  # a one-pixel segment
    segments = [s for s in (replace(CARD.segments[0], label=i, color=(200, 10 * i, 30)) for i in (1, 2, 3, 4))]
    image = render_overlay(values, (40.0, 400.0), labels, segments, OverlayStyle(fill_opacity=opacity))
    expected = _reference_overlay_pixels(windowed_gray(values, 40.0, 400.0), labels, segments, opacity)
    assert image.shape[0] > 512
    np.testing.assert_array_equal(image[:512], expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_present_segments_agrees_with_the_set_of_values(dtype: type) -> None:
    card = replace(CARD, segments=tuple(replace(CARD.segments[0], label=i, name=f"S{i}") for i in (1, 2, 3, 300)))
    labelmap = np.zeros((6, 32, 32), dtype)
    labelmap[2, 5, 5] = 3
    labelmap[4, 0, 31] = 1
    if dtype is not np.uint8:
        labelmap[5, 31, 0] = 300
    present = Prediction(card, labelmap).present_segments()
    assert [s.label for s in present] == sorted({int(v) for v in np.unique(labelmap)} - {0})
    assert Prediction(card, np.zeros((3, 4, 4), dtype)).present_segments() == ()
