"""Class names of the five datasets (paper App. A) and the raw-id -> train-id maps.

`registry.DATASETS` pairs each list with its dataset (the synthetic ones: `synthetic.SPECS`).

Names and order follow MMSegmentation"s dataset classes (``PascalVOCDataset``, ``ADE20KDataset``,
``COCOStuffDataset``, ``CityscapesDataset``, ``MapillaryDataset_v1``), so a model fine-tuned here
and exported to MMSeg has the same class indices. Two deliberate differences in wording:

- ADE20K: MMSeg writes ``"bed "`` (trailing space); we write ``"bed"``.
- Mapillary: MMSeg"s readable names (``"Crosswalk - Plain"``, ...) are kept as is, including
  the capitals; they are the ``readable`` fields of the Vistas v1.2 ``config.json``.

Train ids are dataset-local: ``0..len(classes) - 1``, ``IGNORE_INDEX`` (255)
means "no label". The raw -> train maps are 256-entry uint8 lookup tables
(``lut[raw_label_png]`` gives train ids); raw values not listed map to 255.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door",
    "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag")

COCO_STUFF_CLASSES: tuple[str, ...] = (
    # 80 things
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
    # 91 stuff
    "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood")

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle")

# Mapillary Vistas v1.2: ids 0..65 as stored in the v1.2 label PNGs. MMSeg
# (MapillaryDataset_v1, configs with num_classes=66) and the paper ("66 object
# categories") both keep 65 "Unlabeled" as an ordinary class; so do we.
MAPILLARY_CLASSES: tuple[str, ...] = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall",
    "Bike Lane", "Crosswalk - Plain", "Curb Cut", "Parking",
    "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk",
    "Bridge", "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist",
    "Other Rider", "Lane Marking - Crosswalk", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water",
    "Banner", "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera",
    "Fire Hydrant", "Junction Box", "Mailbox", "Manhole", "Phone Booth",
    "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole",
    "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)",
    "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle",
    "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow",
    "Car Mount", "Ego Vehicle", "Unlabeled")

# COCO-Stuff-164k stuffthingmaps hold (COCO category id - 1) in 0..181, 255 = unlabeled. These 11
# thing ids have no COCO category (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 in 1-based COCO
# numbering); the remaining 171 keep their order. MMSeg"s converter leaves such pixels unchanged
# (they never occur in the released maps); we map them to 255.
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (
    11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# Cityscapes labelId -> trainId, in trainId order (cityscapesScripts labels.py).
CITYSCAPES_LABEL_IDS: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full((256,), IGNORE_INDEX, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    lut.setflags(write=False)
    return lut


COCO_STUFF_ID_TO_TRAIN_ID: dict[int, int] = {
    raw: i for i, raw in enumerate(
        r for r in range(182) if r not in COCO_STUFF_UNUSED_IDS)}
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {raw: i for i, raw in enumerate(CITYSCAPES_LABEL_IDS)}

# uint8 lookup tables: train_ids = LUT[raw_ids].
COCO_STUFF_LUT = _lut(COCO_STUFF_ID_TO_TRAIN_ID)
CITYSCAPES_LUT = _lut(CITYSCAPES_ID_TO_TRAIN_ID)
# ADE20K: reduce-zero-label, 0 (other) -> 255, k -> k - 1 for k in 1..150.
ADE20K_LUT = _lut({k: k - 1 for k in range(1, 151)})
VOC_LUT = _lut({k: k for k in range(21)})
MAPILLARY_LUT = _lut({k: k for k in range(66)})
