"""A deterministic (from ``SynthConfig.seed``) generator of an ASE-like AOI dataset.

Every image is drawn by the same process, whatever its class:

- a PCB-like background (dark green/grey with pixel noise, copper traces and pads) that is shared by
  the 1-3 images of one "board" (one physical board photographed at several spots, the ``group``);
- a dark text band at the top with two printed lines in a light colour:
  line 1 ``LOT A7 ID 0123`` carries no label information (lot and running id),
  line 2 ``LEN 12.4 AREA 0.53 DIFF 41`` holds one ``KEY value`` pair per entry of
  :attr:`SynthClass.fields`, drawn from the class's Gaussian: most of the class signal is here;
- pink dot markers (exactly ``dot_color``, no anti-aliasing, never touching) in the inspection area
  below the band, their centres drawn from the class's bivariate Gaussian;
- under each dot a faint defect mark of the class's ``defect_shape`` with contrast ``pixel_signal``,
  so the pixels alone separate the classes only weakly;
- beside the image, two records (``dataset.yaml`` names them as ``metadata_columns``): an
  ``operator_note`` (free text: with probability ``metadata_signal`` a remark typical of the class,
  else one of a few remarks shared by all classes) and a ``probe_reading`` (a number whose mean moves
  by half of ``metadata_signal`` per class index, std 0.5). They are drawn from their own random stream
  (seed, ``METADATA_STREAM``), so the images are the same with or without them.

Output layout of :func:`generate_synthetic`::

    out_dir/images/<class>/<class>_<i:04d>.png
    out_dir/manifest.csv     image_path, label, binary_label, group (the board), lot,
                             operator_note, probe_reading (the records beside the image)
    out_dir/dataset.yaml     classes, normal class, source "synthetic", seed, scale
    out_dir/truth.csv        generation ground truth (see below)

``truth.csv`` holds what was drawn for each image: the printed lines, every field value exactly as
printed, and the dot centres (JSON list of ``[x, y]`` pixels). It exists for tests and for checking
OCR and task-specific augmentation (TDA) against ground truth. It must NEVER be fed to a model:
it contains the answers.

Reading the text back: the band's layout depends only on the config (:func:`text_layout`), so a
crop of ``text_layout(config).line_boxes[i]``, upscaled 2x (LANCZOS), read by tesseract with
``--psm 7`` gives the printed line exactly on (nearly) every image at the default font_size 16.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ase_ray.config import SynthClass, SynthConfig
from ase_ray.data.manifest import (
    BINARY_LABEL,
    DEFECT,
    GROUP,
    IMAGE_PATH,
    LABEL,
    NORMAL,
    DatasetInfo,
    write_dataset_info,
    write_manifest,
)
from ase_ray.errors import DataError
from ase_ray.outputs import check_output_dir

MANIFEST_NAME = "manifest.csv"
TRUTH_NAME = "truth.csv"
IMAGES_DIR = "images"
LOT = "lot"

# Decimals printed per field name; fields not listed get DEFAULT_DECIMALS.
FIELD_DECIMALS = {"LEN": 1, "AREA": 2, "DIFF": 0}
DEFAULT_DECIMALS = 2

# Lot codes avoid characters that OCR confuses with each other (B/8/&, I/1, O/0/Q, S/5, Z/2, 9/Q).
LOT_LETTERS = "ACDEFGHJKLMNPRTUVWXY"
LOT_DIGITS = "3467"
BOARD_SIZES = (1, 2, 3)  # images per board, drawn uniformly
MAX_DOT_TRIES = 10_000

TEXT_BAND_COLOR = (18, 22, 20)
TEXT_COLOR = (232, 232, 220)
MARK_COLOR = (235, 235, 235)  # defect marks brighten towards this grey
# Texture colours stay far from the pink dots: blue stays low wherever red is high.
BOARD_BASE_LOW = (22, 50, 32)
BOARD_BASE_HIGH = (48, 82, 52)
COPPER_LOW = (160, 100, 40)
COPPER_HIGH = (200, 135, 70)
PIXEL_NOISE_STD = 6.0
PNG_COMPRESS_LEVEL = 1  # noisy images barely compress; level 1 is 4x faster than the default 6
BOARD_MARGIN = 32  # a board is this much larger than an image; each image is one crop of it

TRUTH_BASE_COLUMNS = ("image_path", "label", "group", "lot", "serial", "line1", "line2", "dots")


@dataclass(frozen=True)
class TextLayout:
    """Where the text band and its two lines sit; depends only on the config, never on the text."""

    band_height: int
    line_boxes: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]  # (x0, y0, x1, y1)
    text_origins: tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class BoardPlan:
    board_id: str
    label: str
    size: int
    texture_seed: int
    lot: str


# --------------------------------------------------------------------------------------- geometry
@lru_cache(maxsize=8)
def printed_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded font: the same glyphs on every machine, no system fonts needed."""
    return ImageFont.load_default(size=size)


def text_layout(config: SynthConfig) -> TextLayout:
    font = printed_font(config.font_size)
    ascent, descent = font.getmetrics()
    pad_x = max(4, config.font_size // 2)
    pad_y = max(2, config.font_size // 4)
    line_height = ascent + descent + config.font_size // 4
    boxes = []
    origins = []
    for i in range(2):
        top = pad_y + i * line_height
        boxes.append((0, top, config.width, top + line_height))
        origins.append((pad_x, top + config.font_size // 8))
    band_height = 2 * pad_y + 2 * line_height
    return TextLayout(band_height, (boxes[0], boxes[1]), (origins[0], origins[1]))


def text_region(config: SynthConfig) -> list[float]:
    """Where the text is printed, as fractions (x0, y0, x1, y1): a label-free layout hint for OCR."""
    return [0.0, 0.0, 1.0, round(text_layout(config).band_height / config.height, 4)]


def inspection_area(config: SynthConfig) -> tuple[int, int, int, int]:
    """The region below the text band, (x0, y0, x1, y1) with x1/y1 exclusive."""
    return (0, text_layout(config).band_height, config.width, config.height)


def dot_centre_box(config: SynthConfig) -> tuple[int, int, int, int]:
    """Inclusive pixel range of dot centres: the inspection area less a margin so no dot is cut."""
    x0, y0, x1, y1 = inspection_area(config)
    margin = config.dot_radius + 2
    box = (x0 + margin, y0 + margin, x1 - 1 - margin, y1 - 1 - margin)
    if box[2] - box[0] < 4 * config.dot_radius or box[3] - box[1] < 4 * config.dot_radius:
        raise DataError(
            f"synthetic images of {config.width}x{config.height} leave no room for dots below the "
            f"text band ({y0} px high at font_size {config.font_size}); make them taller"
        )
    return box


def normalised_to_pixel(u: float, v: float, config: SynthConfig) -> tuple[int, int]:
    """Map (0..1, 0..1) in the inspection area to the dot-centre pixel grid."""
    x0, y0, x1, y1 = dot_centre_box(config)
    return x0 + round(u * (x1 - x0)), y0 + round(v * (y1 - y0))


# ------------------------------------------------------------------------------------ printed text
def format_field(name: str, value: float) -> str:
    decimals = FIELD_DECIMALS.get(name, DEFAULT_DECIMALS)
    return f"{max(0.0, value):.{decimals}f}"  # max(0.0, -0.0) is 0.0, never "-0.0"


def draw_field_values(rng: np.random.Generator, cls: SynthClass) -> dict[str, str]:
    """One printed value per field, N(mean, std) clipped at 0, formatted as printed."""
    return {name: format_field(name, rng.normal(mean, std)) for name, (mean, std) in cls.fields.items()}


def draw_lot(rng: np.random.Generator) -> str:
    return LOT_LETTERS[rng.integers(len(LOT_LETTERS))] + LOT_DIGITS[rng.integers(len(LOT_DIGITS))]


def id_line(lot: str, serial: int) -> str:
    return f"LOT {lot} ID {serial:04d}"


def fields_line(values: dict[str, str]) -> str:
    return " ".join(f"{name} {value}" for name, value in values.items())


def glyph_positions(line: str, config: SynthConfig) -> tuple[list[tuple[float, str]], float]:
    """Each character's x offset within a printed line, and the line's width.

    The embedded font sets glyphs tightly: OCR then drops the 1-2 px decimal point ("6.2" -> "62")
    and glues "6 ID" into "61D". One pixel of tracking per character and half an em between words
    make tesseract read the lines back; the text itself stays single-spaced words.
    """
    font = printed_font(config.font_size)
    tracking = max(1, config.font_size // 16)
    word_gap = max(3, config.font_size // 2)
    positions: list[tuple[float, str]] = []
    x = 0.0
    for w, word in enumerate(line.split(" ")):
        if w:
            x += word_gap
        for c, char in enumerate(word):
            if c:
                x += tracking
            positions.append((x, char))
            x += font.getlength(char)
    return positions, x


def draw_text_band(image: Image.Image, lines: tuple[str, str], config: SynthConfig) -> None:
    layout = text_layout(config)
    font = printed_font(config.font_size)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, config.width - 1, layout.band_height - 1), fill=TEXT_BAND_COLOR)
    for line, (x0, y) in zip(lines, layout.text_origins):
        positions, width = glyph_positions(line, config)
        if x0 + width > config.width - 2:
            raise DataError(
                f"printed line {line!r} is wider than the {config.width}px image at font_size "
                f"{config.font_size}; lower font_size or widen the image"
            )
        for x, char in positions:
            draw.text((x0 + x, y), char, font=font, fill=TEXT_COLOR)


# ----------------------------------------------------------------------------------- board texture
def render_board_texture(texture_seed: int, config: SynthConfig) -> np.ndarray:
    """A PCB-like background, larger than one image by BOARD_MARGIN; read-only uint8 HxWx3."""
    return board_texture(texture_seed, config.width + BOARD_MARGIN, config.height + BOARD_MARGIN)


@lru_cache(maxsize=4)  # the 1-3 images of a board are rendered one after another
def board_texture(texture_seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(texture_seed)
    base = rng.integers(BOARD_BASE_LOW, np.add(BOARD_BASE_HIGH, 1))
    board = Image.new("RGB", (width, height), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(board)
    for _ in range(rng.integers(2, 6)):
        draw_trace(draw, rng, width, height)
    for _ in range(rng.integers(3, 9)):
        draw_pad(draw, rng, width, height)
    pixels = np.array(board, dtype=np.uint8)
    pixels.setflags(write=False)
    return pixels


def copper_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(COPPER_LOW, np.add(COPPER_HIGH, 1)))


def draw_trace(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    thickness = int(rng.integers(2, 7))
    if rng.random() < 0.5:
        y = int(rng.integers(0, height))
        start, end = sorted(int(v) for v in rng.integers(0, width, size=2))
        draw.rectangle((start, y, max(end, start + width // 4), y + thickness), fill=copper_colour(rng))
    else:
        x = int(rng.integers(0, width))
        start, end = sorted(int(v) for v in rng.integers(0, height, size=2))
        draw.rectangle((x, start, x + thickness, max(end, start + height // 4)), fill=copper_colour(rng))


def draw_pad(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    w, h = (int(v) for v in rng.integers(6, 20, size=2))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    draw.rectangle((x, y, x + w, y + h), fill=copper_colour(rng))


def crop_with_noise(board: np.ndarray, rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """One photographed spot of the board: a random crop plus per-pixel sensor noise (float)."""
    dy, dx = (int(v) for v in rng.integers(0, BOARD_MARGIN + 1, size=2))
    crop = board[dy : dy + config.height, dx : dx + config.width].astype(np.float32)
    # Luminance noise (one value for all three channels): cheap, and it never tints a pixel pink.
    noise = rng.standard_normal((config.height, config.width, 1), dtype=np.float32)
    return crop + PIXEL_NOISE_STD * noise


# ------------------------------------------------------------------------------------ dots + marks
def sample_unit_point(rng: np.random.Generator, cls: SynthClass) -> tuple[float, float]:
    """A point from the class's bivariate Gaussian, resampled (not clipped) until inside [0, 1]^2."""
    (mx, my), (sx, sy), rho = cls.dot_mean, cls.dot_std, cls.dot_corr
    for _ in range(MAX_DOT_TRIES):
        z1, z2 = rng.standard_normal(2)
        u = mx + sx * z1
        v = my + sy * (rho * z1 + math.sqrt(1.0 - rho * rho) * z2)
        if 0.0 <= u <= 1.0 and 0.0 <= v <= 1.0:
            return float(u), float(v)
    raise DataError(f"class {cls.name!r}: dot_mean/dot_std put almost no mass inside the inspection area")


def sample_dot_centres(rng: np.random.Generator, cls: SynthClass, config: SynthConfig) -> list[list[int]]:
    """k centres in pixels, never closer than 2*radius+3 (so dots never touch)."""
    low, high = sorted(cls.dots)
    k = int(rng.integers(low, high + 1))
    min_distance = 2 * config.dot_radius + 3
    centres: list[list[int]] = []
    tries = 0
    while len(centres) < k:
        tries += 1
        if tries > MAX_DOT_TRIES:
            raise DataError(f"class {cls.name!r}: cannot place {k} non-touching dots; widen dot_std")
        x, y = normalised_to_pixel(*sample_unit_point(rng, cls), config)
        if all(math.hypot(x - cx, y - cy) >= min_distance for cx, cy in centres):
            centres.append([x, y])
    return centres


def defect_mark_mask(rng: np.random.Generator, shape: str, centres: list[list[int]], config: SynthConfig) -> np.ndarray:
    """A 0/1 float mask of the class's defect shape under every dot (all zeros for 'none')."""
    mask = Image.new("L", (config.width, config.height), 0)
    draw = ImageDraw.Draw(mask)
    r = config.dot_radius
    for cx, cy in centres:
        if shape == "line":
            half = rng.uniform(4 * r, 7 * r)
            angle = rng.uniform(0, math.pi)
            dx, dy = half * math.cos(angle), half * math.sin(angle)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=2)
        elif shape == "disk":
            radius = 2.5 * r
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        elif shape == "ring":
            radius = 3 * r
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=255, width=2)
        elif shape == "bar":
            long, short = (4 * r, 1.5 * r) if rng.random() < 0.5 else (1.5 * r, 4 * r)
            draw.rectangle((cx - long, cy - short, cx + long, cy + short), fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def apply_defect_marks(pixels: np.ndarray, mask: np.ndarray, contrast: float) -> np.ndarray:
    """Brighten the masked pixels towards a light grey by ``contrast`` (0 leaves them unchanged)."""
    if contrast <= 0 or not mask.any():
        return pixels
    weight = (contrast * mask)[..., None]
    return pixels + weight * (np.asarray(MARK_COLOR, dtype=np.float32) - pixels)


def draw_dots(image: Image.Image, centres: list[list[int]], config: SynthConfig) -> None:
    # ImageDraw on an RGB image does not anti-alias: every dot pixel is exactly dot_color.
    draw = ImageDraw.Draw(image)
    r = config.dot_radius
    for cx, cy in centres:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(config.dot_color))


# ------------------------------------------------------------------------------------- one image
def render_image(
    rng: np.random.Generator,
    cls: SynthClass,
    config: SynthConfig,
    *,
    texture_seed: int | None = None,
    lot: str | None = None,
    serial: int | None = None,
) -> tuple[Image.Image, dict]:
    """Render one image of class ``cls``.

    ``texture_seed``, ``lot`` and ``serial`` tie the image to a board; when left out they are drawn
    from ``rng``. Returns the image and what was drawn: ``label``, ``lot``, ``serial``, ``fields``
    (name -> value exactly as printed), ``lines`` (the two printed lines) and ``dots`` (``[x, y]``
    pixel centres).
    """
    if texture_seed is None:
        texture_seed = int(rng.integers(2**32))
    if lot is None:
        lot = draw_lot(rng)
    if serial is None:
        serial = int(rng.integers(10_000))
    fields = draw_field_values(rng, cls)
    lines = (id_line(lot, serial), fields_line(fields))
    centres = sample_dot_centres(rng, cls, config)

    pixels = crop_with_noise(render_board_texture(texture_seed, config), rng, config)
    pixels = apply_defect_marks(pixels, defect_mark_mask(rng, cls.defect_shape, centres, config), config.pixel_signal)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    draw_text_band(image, lines, config)
    draw_dots(image, centres, config)
    info = {"label": cls.name, "lot": lot, "serial": serial, "fields": fields, "lines": list(lines), "dots": centres}
    return image, info


# ---------------------------------------------------------------------------------- whole dataset
def plan_boards(config: SynthConfig, rng: np.random.Generator) -> list[BoardPlan]:
    """Split every class into boards of 1-3 images, then shuffle the boards across classes.

    Board ids and printed running ids follow the shuffled order, so neither numbers the classes.
    """
    counts = config.counts()
    drafts: list[tuple[str, int]] = []
    for cls in config.classes:
        remaining = counts[cls.name]
        while remaining > 0:
            size = min(remaining, int(rng.choice(BOARD_SIZES)))
            drafts.append((cls.name, size))
            remaining -= size
    order = rng.permutation(len(drafts))
    return [
        BoardPlan(
            board_id=f"b{number:04d}",
            label=drafts[i][0],
            size=drafts[i][1],
            texture_seed=int(rng.integers(2**32)),
            lot=draw_lot(rng),
        )
        for number, i in enumerate(order)
    ]


def generate_synthetic(config: SynthConfig, out_dir: Path, progress: bool = False) -> pd.DataFrame:
    """Write the dataset under ``out_dir`` and return its manifest (absolute image paths)."""
    out_dir = check_output_dir(Path(out_dir).resolve(), "data synth --out")
    rng = np.random.default_rng(config.seed)
    classes = {cls.name: cls for cls in config.classes}
    boards = plan_boards(config, rng)
    for name in classes:
        (out_dir / IMAGES_DIR / name).mkdir(parents=True, exist_ok=True)

    metadata_rng = np.random.default_rng([config.seed, METADATA_STREAM])
    class_index = {name: i for i, name in enumerate(classes)}
    next_index = {name: 0 for name in classes}
    rows: list[dict] = []
    truth: list[dict] = []
    serial = 0
    total = sum(board.size for board in boards)
    with tqdm(total=total, desc="synthetic images", unit="img", disable=not progress) as bar:
        for board in boards:
            for _ in range(board.size):
                image_rng = np.random.default_rng(rng.integers(2**63))
                image, info = render_image(
                    image_rng, classes[board.label], config,
                    texture_seed=board.texture_seed, lot=board.lot, serial=serial,
                )
                relative = f"{IMAGES_DIR}/{board.label}/{board.label}_{next_index[board.label]:04d}.png"
                image.save(out_dir / relative, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
                rows.append({**manifest_row(out_dir / relative, board, config),
                             **draw_records(metadata_rng, board.label, class_index[board.label], config)})
                truth.append(truth_row(relative, board, info))
                next_index[board.label] += 1
                serial += 1
                bar.update(1)

    class_order = {name: i for i, name in enumerate(classes)}
    manifest = sort_rows(pd.DataFrame(rows), class_order)
    write_manifest(manifest, out_dir / MANIFEST_NAME)
    write_truth(sort_rows(pd.DataFrame(truth), class_order), out_dir / TRUTH_NAME)
    write_dataset_info(
        out_dir,
        DatasetInfo(
            classes=list(classes),
            normal_class=config.normal_class,
            source="synthetic",
            extra={"seed": config.seed, "scale": config.scale, "text_region": text_region(config),
                   "domain": SYNTHETIC_DOMAIN, "metadata_columns": list(METADATA_COLUMNS)},
        ),
    )
    return manifest


SYNTHETIC_DOMAIN = "automated optical inspection image"  # dataset.yaml `domain`: the LLM prompt's {domain}


METADATA_STREAM = 7919  # the records' random stream: seed-determined, apart from the images'
METADATA_COLUMNS = ("operator_note", "probe_reading")
SHARED_NOTES = ("routine check", "rechecked after cleaning", "flagged by AOI, operator unsure",
                "second shift review", "no remark")
CLASS_NOTES = {
    "normal": "looks clean to the operator",
    "scratch": "thin line visible under the loupe",
    "particle": "small speck, maybe dust",
    "void": "hollow spot near the pad",
    "bridge": "solder looks joined between pads",
}


def draw_records(rng: np.random.Generator, label: str, index: int, config: SynthConfig) -> dict:
    """The records beside one image: an operator note and a probe reading, weakly tied to the class."""
    typical = rng.random() < config.metadata_signal
    shared = SHARED_NOTES[int(rng.integers(len(SHARED_NOTES)))]
    note = CLASS_NOTES.get(label, f"operator suspects {label}") if typical else shared
    reading = rng.normal(1.0 + 0.5 * config.metadata_signal * index, 0.5)
    return {METADATA_COLUMNS[0]: note, METADATA_COLUMNS[1]: round(float(reading), 2)}


def manifest_row(path: Path, board: BoardPlan, config: SynthConfig) -> dict:
    return {
        IMAGE_PATH: str(path),
        LABEL: board.label,
        BINARY_LABEL: NORMAL if board.label == config.normal_class else DEFECT,
        GROUP: board.board_id,
        LOT: board.lot,
    }


def truth_row(relative_path: str, board: BoardPlan, info: dict) -> dict:
    clashes = set(info["fields"]) & set(TRUTH_BASE_COLUMNS)
    if clashes:
        raise DataError(f"synthetic field name(s) {sorted(clashes)} clash with truth.csv columns")
    row = {
        "image_path": relative_path,
        "label": info["label"],
        "group": board.board_id,
        "lot": info["lot"],
        "serial": f"{info['serial']:04d}",
        "line1": info["lines"][0],
        "line2": info["lines"][1],
    }
    row.update(info["fields"])
    row["dots"] = json.dumps(info["dots"])
    return row


def sort_rows(df: pd.DataFrame, class_order: dict[str, int]) -> pd.DataFrame:
    """Rows by class (config order) then file name, independent of generation order."""
    keys = df[LABEL].map(class_order)
    return df.assign(_order=keys).sort_values(["_order", IMAGE_PATH], kind="stable").drop(columns="_order").reset_index(drop=True)


def write_truth(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def read_truth(path: str | Path) -> pd.DataFrame:
    """Read ``truth.csv`` (tests and TDA checks only): every value as printed, ``dots`` parsed."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_NAME
    if not path.is_file():
        raise DataError(f"synthetic ground truth not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["dots"] = [json.loads(text) for text in df["dots"]]
    return df
