"""Dataset tab: drop pictures (or a zip, or give a folder), see them with their captions, caption, edit, tag.

The handlers are module-level functions of plain values: the dataset folder is a path string ("" until the first
picture arrives) and most of them answer `refresh(folder, message)`: the folder, a message, the gallery and the
tag table. `build()` lays the components out and binds them. Captioning runs in a child process (ui.captioning).
The trigger word last applied is kept in a state of its own, so that a new one replaces it in the captions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from datasets_tools import dataset_folder as folder_ops
from datasets_tools.caption import ALL_CAPTIONED, to_caption
from trainer.config import bucket_limits
from trainer.single_file import MODEL_CONFIGS
from ui import security
from ui.captioning import CaptionJob

DEMO_DATASET = Path(__file__).resolve().parent.parent / "demo" / "dataset"
CAPTIONERS = [("WD14 tagger (tags, for anime / illustration)", "wd14"), ("BLIP (a sentence)", "blip"),
              ("Florence-2 (a detailed sentence)", "florence2")]
POLL_S = 1.0  # how often the tab reads a running captioner's progress
NO_PICTURES = "Add pictures first."
CLIP_TOKENIZER = MODEL_CONFIGS / "clip_tokenizer"  # the BPE vocabulary every SD text encoder reads


@dataclass
class DatasetTab:
    trigger: gr.Textbox
    gallery: gr.Gallery
    check: gr.Button
    health: gr.Markdown
    selected: gr.Textbox
    caption: gr.Textbox
    crop: gr.Image


# --- what the tab shows of a folder ---

def gallery_items(folder: str) -> list[tuple[str, str]]:
    if not folder:
        return []
    return [(str(item.image), item.caption or "(no caption)") for item in folder_ops.items(Path(folder))]


def tag_table(folder: str) -> list[list]:
    if not folder:
        return []
    freq = folder_ops.tag_frequency(Path(folder))
    return [[tag, count] for tag, count in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]


def refresh(folder: str, message: str) -> tuple[str, str, list, list]:
    return folder, message, gallery_items(folder), tag_table(folder)


# --- adding pictures: into the session's folder, made under `drafts` on the first add ---

def draft_folder(drafts: Path, folder: str) -> Path:
    if folder:
        return Path(folder)
    path = Path(drafts) / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    return path


def add(drafts: Path, sources: list[Path], folder: str) -> tuple[str, str, list, list]:
    target = draft_folder(drafts, folder)
    return refresh(str(target), folder_ops.add_files(sources, target).to_markdown())


def on_upload(drafts: Path, files: list[str] | None, folder: str):
    """Import the dropped files, then empty the upload box (None): the box adds each drop to what it holds, and
    would hand the files imported already to the next import again."""
    shown = add(drafts, [Path(f) for f in files], folder) if files else refresh(folder, "")
    return *shown, None


def on_folder(drafts: Path, path: str, folder: str):
    if not path or not Path(path).expanduser().is_dir():
        return refresh(folder, f"⚠ {path!r} is not a folder on this machine")
    return add(drafts, [Path(path).expanduser()], folder)


def on_demo(drafts: Path):
    """The demo pictures in a fresh folder, and their trigger word: for the trigger box, and as the one applied."""
    folder, *shown = add(drafts, [DEMO_DATASET], "")
    trigger = folder_ops.first_tag(Path(folder))
    return folder, *shown, trigger, trigger


def on_clear():
    """No dataset, an empty upload box and no trigger applied."""
    return *refresh("", ""), None, ""


# --- caption edits ---

def on_save(folder: str, name: str, text: str):
    if not folder or not name:
        return refresh(folder, "Select a picture first.")
    try:  # the name comes from the page: a picture right in the folder (or a kohya sub-folder), never a path
        parent, _, base = name.rpartition("/")
        place = security.inside(Path(folder), parent, "folder") if parent else Path(folder)
        picture = security.inside(place, base, "picture")
    except ValueError as e:
        return refresh(folder, f"⚠ {e}")
    if not picture.is_file():
        return refresh(folder, f"⚠ no picture {name!r} in this dataset")
    folder_ops.set_caption(picture, text)
    return refresh(folder, f"Saved the caption of {name}.")


def on_trigger(folder: str, word: str, applied: str):
    """`word` first in every caption, in place of the trigger `applied` before; answers the trigger now applied."""
    word = word.strip()
    if not folder:
        return *refresh(folder, NO_PICTURES), applied
    if not word:
        return *refresh(folder, ""), applied
    if "," in word:
        return *refresh(folder, f"⚠ “{word}” holds a comma, and captions are tags split at commas: a trigger word "
                                "is one tag (spaces are fine)."), applied
    n = folder_ops.apply_trigger(Path(folder), word, applied)
    return *refresh(folder, f"“{word}” is first in {n} captions."), word


def on_tag(folder: str, old: str, new: str):
    if not folder or not old:
        return refresh(folder, "Name a tag first.")
    n = folder_ops.rename_tag(Path(folder), old, new)
    verb = f"renamed to “{new}”" if new else "removed"
    return refresh(folder, f"“{old}” {verb} in {n} captions.")


def on_bulk(folder: str, prefix: str, suffix: str, find: str, replace: str, keep: float | None):
    """Find/replace, then tags added at the front and end, then only the first `keep` tags (0 = all)."""
    if not folder:
        return refresh(folder, NO_PICTURES)

    def edit(c: str) -> str:
        c = folder_ops.with_prefix_suffix(folder_ops.replaced(c, find, replace), prefix, suffix)
        return folder_ops.first_tags(c, int(keep)) if keep else c

    return refresh(folder, f"Changed {folder_ops.edit_all(Path(folder), edit)} captions.")


# --- captioning in a child process; a timer polls it while it runs ---
# Each returns (job, status message, the poll timer) and, from poll and cancel, the gallery and tag table.

def on_caption_start(job: CaptionJob | None, folder: str, kind: str, source: str, replace: bool):
    if job and job.running:
        return job, job.progress(), gr.Timer(active=True)
    if not folder:
        return None, NO_PICTURES, gr.Timer(active=False)
    if not to_caption(Path(folder), bool(replace)):
        return None, ALL_CAPTIONED, gr.Timer(active=False)
    job = CaptionJob(Path(folder), kind, source or "", bool(replace))
    return job, job.progress(), gr.Timer(active=True)


def on_caption_poll(job: CaptionJob | None, folder: str):
    if job and job.running:
        return job, job.progress(), gr.skip(), gr.skip(), gr.skip()
    return None, job.result() if job else gr.skip(), gr.Timer(active=False), gallery_items(folder), tag_table(folder)


def on_caption_cancel(job: CaptionJob | None, folder: str):
    message = job.cancel() if job else "Nothing is being captioned."
    return None, message, gr.Timer(active=False), gallery_items(folder), tag_table(folder)


# --- the selected picture and the health report: ui/app.py binds them to the Train tab's bucket settings ---

def picture_at(folder: str, index: int | None, resolution, min_reso, max_reso, no_upscale):
    """The name of the picture at `index` in the gallery, its caption and where it will be cropped."""
    from PIL import Image

    from datasets_tools import buckets

    items = folder_ops.items(Path(folder)) if folder else []
    if index is None or index >= len(items):
        return "", "", None
    item = items[index]
    with Image.open(item.image) as im:
        grid = buckets.make_buckets(int(resolution), *bucket_limits(int(resolution), int(min_reso), int(max_reso)))
        bucket = buckets.bucket_for_image(im.width, im.height, grid, bool(no_upscale))
        preview = buckets.crop_preview(im, bucket)
    return str(item.image.relative_to(folder)), item.caption, preview


def selection(folder: str, resolution, min_reso, max_reso, no_upscale, evt: gr.SelectData):
    """The picture clicked in the gallery (see picture_at)."""
    return picture_at(folder, evt.index, resolution, min_reso, max_reso, no_upscale)


def health_markdown(folder: str, resolution, min_reso, max_reso, batch, max_tokens=75) -> str:
    """The health report at the Train tab's resolution, batch size and caption length."""
    from datasets_tools.health import report

    if not folder:
        return NO_PICTURES
    r = report(Path(folder), int(resolution), *bucket_limits(int(resolution), int(min_reso), int(max_reso)),
               int(batch), tokenizer_dir=CLIP_TOKENIZER, max_tokens=int(max_tokens or 75))
    return f"At {int(resolution)} px, batch {int(batch)}:\n\n" + r.to_markdown()


# --- layout ---

def build(drafts: Path, dataset_dir: gr.State) -> DatasetTab:
    c = SimpleNamespace()
    with gr.Row():
        c.upload = gr.File(label="Drop pictures or a .zip here", file_count="multiple", elem_id="dataset-upload",
                           scale=3)
        with gr.Column(scale=2):
            c.folder_path = gr.Textbox(label="…or a folder on this machine", elem_id="dataset-folder")
            c.add_folder = gr.Button("Add folder", elem_id="dataset-add-folder")
            c.demo = gr.Button("Try the demo dataset", elem_id="dataset-demo", visible=DEMO_DATASET.is_dir())
            c.clear = gr.Button("Start over", elem_id="dataset-clear")
    c.report = gr.Markdown(elem_id="dataset-report")
    with gr.Accordion("Caption the pictures", open=False, elem_id="dataset-captioner"):
        with gr.Row():
            c.kind = gr.Dropdown(choices=CAPTIONERS, value="wd14", label="Captioner",
                                 elem_id="dataset-captioner-kind")
            c.source = gr.Textbox(label="Model folder (or hub id when online; empty = the default)",
                                  elem_id="dataset-captioner-source", scale=2)
            c.overwrite = gr.Checkbox(label="Replace existing captions", value=False, elem_id="dataset-overwrite")
        with gr.Row():
            c.caption_run = gr.Button("Caption", elem_id="dataset-caption-run")
            c.caption_cancel = gr.Button("Cancel captioning", variant="stop", elem_id="dataset-caption-cancel")
        c.caption_status = gr.Markdown(elem_id="dataset-caption-status")
    with gr.Row():
        c.trigger = gr.Textbox(label="Trigger word (kept first in every caption)", elem_id="dataset-trigger",
                               scale=3)
        c.apply_trigger = gr.Button("Apply to all captions", elem_id="dataset-apply-trigger")
    c.gallery = gr.Gallery(label="Pictures and captions (click one to edit its caption)", columns=6, height=360,
                           allow_preview=False, elem_id="dataset-gallery")
    with gr.Row():
        c.selected = gr.Textbox(label="Selected picture", interactive=False, elem_id="dataset-selected", scale=2)
        c.caption = gr.Textbox(label="Caption", elem_id="dataset-caption", scale=4)
        c.save_caption = gr.Button("Save caption", elem_id="dataset-save-caption")
    with gr.Row():
        c.check = gr.Button("Check the dataset (health report and buckets)", elem_id="dataset-check")
    c.health = gr.Markdown(elem_id="dataset-health")
    with gr.Accordion("Tags", open=False, elem_id="dataset-tags"):
        c.tags = gr.Dataframe(headers=["tag", "count"], interactive=False, elem_id="dataset-tag-table")
        with gr.Row():
            c.tag_from = gr.Textbox(label="Tag", elem_id="dataset-tag-from")
            c.tag_to = gr.Textbox(label="Rename to (empty = remove)", elem_id="dataset-tag-to")
            c.tag_apply = gr.Button("Rename / remove in every caption", elem_id="dataset-tag-apply")
        with gr.Row():
            c.prefix = gr.Textbox(label="Add tags at the front", elem_id="dataset-prefix")
            c.suffix = gr.Textbox(label="Add tags at the end", elem_id="dataset-suffix")
            c.find = gr.Textbox(label="Find", elem_id="dataset-find")
            c.replace = gr.Textbox(label="Replace with", elem_id="dataset-replace")
            c.keep = gr.Number(label="Keep the first N tags (0 = all)", value=0, precision=0, elem_id="dataset-keep")
            c.bulk = gr.Button("Apply to every caption", elem_id="dataset-bulk-apply")
    c.crop = gr.Image(label="Crop preview of the selected picture (kept area outlined)", interactive=False,
                      height=256, elem_id="dataset-crop-preview")
    bind(c, Path(drafts), dataset_dir)
    return DatasetTab(trigger=c.trigger, gallery=c.gallery, check=c.check, health=c.health, selected=c.selected,
                      caption=c.caption, crop=c.crop)


def bind(c: SimpleNamespace, drafts: Path, dataset_dir: gr.State) -> None:
    shown = [dataset_dir, c.report, c.gallery, c.tags]
    applied = gr.State("")  # the trigger word in the captions' front, put there by on_trigger or the demo
    c.upload.upload(partial(on_upload, drafts), [c.upload, dataset_dir], shown + [c.upload])
    c.add_folder.click(partial(on_folder, drafts), [c.folder_path, dataset_dir], shown)
    c.demo.click(partial(on_demo, drafts), None, shown + [c.trigger, applied])
    c.clear.click(on_clear, None, shown + [c.upload, applied])
    c.save_caption.click(on_save, [dataset_dir, c.selected, c.caption], shown)
    c.apply_trigger.click(on_trigger, [dataset_dir, c.trigger, applied], shown + [applied])
    c.tag_apply.click(on_tag, [dataset_dir, c.tag_from, c.tag_to], shown)
    c.bulk.click(on_bulk, [dataset_dir, c.prefix, c.suffix, c.find, c.replace, c.keep], shown)

    job = gr.State(None)
    poll = gr.Timer(POLL_S, active=False)
    c.caption_run.click(on_caption_start, [job, dataset_dir, c.kind, c.source, c.overwrite],
                        [job, c.caption_status, poll])
    after = [job, c.caption_status, poll, c.gallery, c.tags]
    poll.tick(on_caption_poll, [job, dataset_dir], after)
    c.caption_cancel.click(on_caption_cancel, [job, dataset_dir], after)
