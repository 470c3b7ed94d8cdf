"""The built-in ``lungs-ct`` model's card (labels, codes, measurements) and tunable parameters."""

from __future__ import annotations

from dataclasses import dataclass

from inference.types import (
    SCT_ANATOMICAL_STRUCTURE,
    Code,
    ModelCard,
    SegmentSpec,
    Task,
)

#: Private code for the percentage of lung voxels below -950 HU (%LAA-950).
#: No standard SNOMED CT / LOINC / DCM code exists for it; the scheme
#: designator ``99DCMNODE`` is this node's private coding scheme.
LAA950_PERCENT = Code("LAA950", "99DCMNODE", "Percent low attenuation area below -950 HU")

#: Findings text of a volume without lungs.
NO_LUNGS_FOUND = "no lungs found"

RIGHT_LUNG = 1
LEFT_LUNG = 2

LUNGS_CT_CARD = ModelCard(
    name="lungs-ct",
    version="1.0.0",
    family="Morphological Operations",
    task=Task.SEGMENTATION,
    intended_use=(
        "Segmentation of the right and left lung on chest CT (HU) by thresholding and "
        "morphology, with lung volume, mean lung density and %LAA-950 per lung. "
        "For quantitative support only, not for diagnosis. Consolidated or collapsed lung "
        "(soft-tissue density) is not included in the lung masks."
    ),
    modality="CT",
    segments=(
        SegmentSpec(
            label=RIGHT_LUNG,
            name="Right lung",
            category=SCT_ANATOMICAL_STRUCTURE,
            type=Code("3341006", "SCT", "Right lung"),
            color=(0, 151, 206),
        ),
        SegmentSpec(
            label=LEFT_LUNG,
            name="Left lung",
            category=SCT_ANATOMICAL_STRUCTURE,
            type=Code("44029006", "SCT", "Left lung"),
            color=(230, 159, 0),
        ),
    ),
)



@dataclass(frozen=True)
class LungsCTParameters:
    """Tunable thresholds of :class:`LungsCT` (HU, ml, mm).

    The defaults suit adult chest CT; change them only with validation data.

    Attributes
    ----------
    body_threshold_hu:
        Body = largest region above this.
    air_threshold_hu:
        Lung (and any air) = below this.
    airway_thresholds_hu:
        Trachea growth thresholds, tried in order until the airway is at most
        ``max_airway_ml``.
    laa_threshold_hu:
        Threshold of the %LAA measurement.
    gas_median_hu:
        A candidate whose median is below this is gas, not lung.
    min_lung_ml, min_lung_extent_mm:
        Smallest lung volume and thickness along the body axis.
    keep_touching_ml:
        Air regions touching the outside air are kept only from this size.
    max_airway_ml:
        Largest plausible trachea + bronchi volume (bigger = leak into lung).
    min_airway_area_cm2, max_airway_area_cm2:
        Cross-section of a trachea seed in an axial slice.
    airway_midline_mm:
        Largest distance of the trachea seed from the body's midline.
    airway_search_mm:
        How far below the top of the air regions to look for the trachea.
    coarse_voxel_mm:
        Target voxel size of the coarse grid.
    max_split_erosion_mm:
        Deepest in-plane erosion tried to separate joined lungs.
    closing_mm:
        In-plane closing radius of the final masks.
    """

    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -320.0
    airway_thresholds_hu: tuple[float, ...] = (-900.0, -950.0, -980.0)
    laa_threshold_hu: float = -950.0
    gas_median_hu: float = -970.0
    min_lung_ml: float = 50.0
    min_lung_extent_mm: float = 15.0
    keep_touching_ml: float = 200.0
    max_airway_ml: float = 200.0
    min_airway_area_cm2: float = 0.2
    max_airway_area_cm2: float = 10.0
    airway_midline_mm: float = 35.0
    airway_search_mm: float = 100.0
    coarse_voxel_mm: float = 1.5
    max_split_erosion_mm: float = 20.0
    closing_mm: float = 2.0
