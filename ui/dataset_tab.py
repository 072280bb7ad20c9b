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
from ui import confirm, security
from ui.captioning import CaptionJob

DEMO_DATASET = Path(__file__).resolve().parent.parent / "demo" / "dataset"
CAPTIONERS = [("WD14 tagger (tags, for anime / illustration)", "wd14"), ("BLIP (a sentence)", "blip"),
              ("Florence-2 (a detailed sentence)", "florence2")]
POLL_S = 1.0  # how often the tab reads a running captioner's progress
NO_PICTURES = "Add pictures first."
STARTED_OVER = "Started over. The pictures before are kept: **Earlier datasets** opens them again."
STALE_HEALTH = "_The dataset changed since this check: click **Check the dataset** again._"
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
    report: gr.Markdown
    tags: gr.Dataframe
    applied: gr.State  # the trigger word applied to the captions (replaced in their front by the next one)

    def shown(self, dataset_dir) -> list:
        """What `refresh` answers: the folder, the message, the gallery and the tag table."""
        return [dataset_dir, self.report, self.gallery, self.tags]


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


def counted(n: int, noun: str = "caption") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def caption_of(folder: str, name: str) -> str:
    """The selected picture's caption as it is on disk now: after an edit of every caption the box shows it, so a
    Save does not write the old text back."""
    found = [i.caption for i in folder_ops.items(Path(folder))
             if str(i.image.relative_to(folder)) == name] if folder and name else []
    return found[0] if found else ""


def stale_health(report: str) -> str:
    """A health report shown before the dataset changed is marked out of date (the next check replaces it)."""
    return report if not report or STALE_HEALTH in report else f"{STALE_HEALTH}\n\n{report}"


def no_selection() -> tuple[str, str, None, str]:
    """A new (or no) dataset: no picture selected, no caption in the box, no crop preview, no health report."""
    return "", "", None, ""


def trigger_of(folder: Path) -> str:
    """The trigger word a dataset has: the tag that starts every caption ("" when the captions do not share one)."""
    firsts = [(folder_ops.split_tags(i.caption) or [""])[0] for i in folder_ops.items(Path(folder))]
    return firsts[0] if firsts and firsts[0] and all(f == firsts[0] for f in firsts) else ""


def restore(drafts: Path, folder: str):
    """The dataset folder this browser last worked on (kept in its storage across a reload), shown again with its
    trigger word (in the box, and as the one applied): [folder, message, gallery, tags, trigger box, applied]. Only
    a draft folder of this app's: anything read from the browser is checked before it is used as a path."""
    try:
        return reopened(draft_named(drafts, folder), "Your pictures from before")
    except ValueError:
        return *refresh("", ""), "", ""


def reopened(path: Path, said: str) -> tuple:
    """A draft folder shown again: [folder, message, gallery, tags, its trigger word twice (box, applied)]."""
    trigger = trigger_of(path)
    return *refresh(str(path), f"{said} ({counted(len(folder_ops.items(path)), 'picture')})."), trigger, trigger


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


def with_applied(shown: tuple, applied: str) -> tuple:
    """New pictures get the trigger word applied before them, as the trigger box promises."""
    folder, message, *_ = shown
    if not applied or not folder:
        return shown
    folder_ops.apply_trigger(Path(folder), applied, applied)
    return refresh(folder, f"{message}\n\n“{applied}” is first in their captions too.")


def on_upload(drafts: Path, files: list[str] | None, folder: str, applied: str = ""):
    """Import the dropped files, then empty the upload box (None): the box adds each drop to what it holds, and
    would hand the files imported already to the next import again."""
    shown = with_applied(add(drafts, [Path(f) for f in files], folder), applied) if files else refresh(folder, "")
    return *shown, None


def on_folder(drafts: Path, path: str, folder: str, applied: str = ""):
    path = (path or "").strip()
    if not path:
        return refresh(folder, "Type the path of a folder of pictures first.")
    if not Path(path).expanduser().is_dir():
        return refresh(folder, f"⚠ “{path}” is not a folder on this machine")
    return with_applied(add(drafts, [Path(path).expanduser()], folder), applied)


def on_demo(drafts: Path):
    """The demo pictures in a fresh folder, and their trigger word: for the trigger box, and as the one applied."""
    folder, *shown = add(drafts, [DEMO_DATASET], "")
    trigger = folder_ops.first_tag(Path(folder))
    return folder, *shown, trigger, trigger


def on_clear():
    """No dataset, an empty upload box, no trigger applied and none in its box."""
    return *refresh("", STARTED_OVER), None, "", ""


# --- earlier datasets: the draft folders this app made, to open again or delete ---

DELETE_DRAFT = "Delete it"


def size_text(path: Path) -> str:
    mb = confirm.folder_mb(path)
    return f"{mb:.1f} MB" if mb >= 0.1 else f"{mb * 1024:.0f} KB"


def drafts_list(drafts: Path, current: str) -> dict:
    """The Earlier datasets dropdown: every draft folder but the one in use, newest first, with its pictures, size
    and age."""
    import time

    found = sorted((p for p in Path(drafts).iterdir() if p.is_dir() and str(p) != current),
                   key=lambda p: p.stat().st_mtime, reverse=True) if Path(drafts).is_dir() else []
    choices = [(f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(p.stat().st_mtime))} · "
                f"{counted(len(folder_ops.items(p)), 'picture')} · {size_text(p)}", str(p))
               for p in found]
    return gr.update(choices=choices, value=None)


def draft_named(drafts: Path, chosen: str) -> Path:
    """A chosen draft folder, only one of this app's (the value comes from the page)."""
    if not chosen:
        raise ValueError("Choose one of the earlier datasets first.")
    path = security.inside(Path(drafts), Path(str(chosen)).name, "dataset folder")
    if str(path) != chosen or not path.is_dir():
        raise ValueError("That dataset is not there any more.")
    return path


def on_open_draft(drafts: Path, chosen: str, folder: str, applied: str):
    """[folder, message, gallery, tags, the trigger applied, the trigger box]: the dataset's own trigger word, the
    tag that starts every caption."""
    try:
        return reopened(draft_named(drafts, chosen), "Opened an earlier dataset")
    except ValueError as e:
        return *refresh(folder, f"⚠ {e}"), applied, gr.update()


def on_delete_draft(drafts: Path, chosen: str, folder: str, armed: str):
    """Delete a draft folder, asked twice (ui/confirm): [folder, message, gallery, tags, armed, the button]."""
    import shutil

    try:
        path = draft_named(drafts, chosen)
    except ValueError as e:
        return *refresh(folder, f"⚠ {e}"), *confirm.disarmed(DELETE_DRAFT)
    go, armed, button = confirm.ask_twice(DELETE_DRAFT, armed, chosen)
    if not go:  # the button names no path: the message above it says what goes
        button = gr.update(value=confirm.AGAIN.format("this dataset"))
        pictures = counted(len(folder_ops.items(path)), "picture")
        return *refresh(folder, f"Deleting it removes {pictures} and their captions ({size_text(path)}); runs keep "
                                "their own copy. Click again to delete it."), armed, button
    shutil.rmtree(path)
    return *refresh(folder, "Deleted that earlier dataset."), armed, button


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


def pending_saved(folder: str, name: str, text: str) -> tuple | None:
    """An edit typed in the Caption box but not saved yet is saved before anything replaces the box's text (another
    picture clicked, an edit of every caption); answers on_save's answer, None when the box held the caption."""
    if not folder or not name or text == caption_of(folder, name):
        return None
    return on_save(folder, name, text)


def on_leave(folder: str, name: str, text: str):
    """Another tab clicked open: the caption typed but not saved is saved (the Train tab trains on the folder), and a
    toast says so; nothing changes when the box holds the saved caption."""
    saved = pending_saved(folder, name, text)
    if saved is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    gr.Info(saved[1])
    return saved


def keeping_edit(handler):
    """`handler(folder, *rest)` taking (folder, name, text, *rest) first, so the Caption box's edit is kept."""
    def edited(folder: str, name: str, text: str, *rest):
        saved, answer = pending_saved(folder, name, text), handler(folder, *rest)
        return (answer[0], f"{saved[1]} {answer[1]}", *answer[2:]) if saved else answer
    return edited


def on_trigger(folder: str, word: str, applied: str):
    """`word` first in every caption, in place of the trigger `applied` before; answers the trigger now applied."""
    word = word.strip()
    if not folder:
        return *refresh(folder, NO_PICTURES), applied
    if not word:
        return *refresh(folder, "Type a trigger word first: a made-up word such as zxq, not a real one."), applied
    if "," in word:
        return *refresh(folder, f"⚠ “{word}” holds a comma, and captions are tags split at commas: a trigger word "
                                "is one tag (spaces are fine)."), applied
    n = folder_ops.apply_trigger(Path(folder), word, applied)
    return *refresh(folder, f"“{word}” is first in {counted(n)}."), word


def on_tag(folder: str, old: str, new: str):
    if not folder or not old:
        return refresh(folder, "Name a tag first.")
    n = folder_ops.rename_tag(Path(folder), old, new)
    if not n:
        return refresh(folder, f"No caption has the tag “{old}” (the table lists every tag).")
    verb = f"renamed to “{new}”" if new else "removed"
    return refresh(folder, f"“{old}” {verb} in {counted(n)}.")


def on_bulk(folder: str, prefix: str, suffix: str, find: str, replace: str, keep: float | None):
    """Find/replace, then tags added at the front and end, then only the first `keep` tags (0 = all)."""
    if not folder:
        return refresh(folder, NO_PICTURES)
    if keep is not None and (keep < 0 or keep != int(keep)):
        return refresh(folder, f"⚠ Keep the first N tags: {keep:g} is not allowed; 0 (keep all) or a whole number "
                               "above it. No caption was changed.")

    def edit(c: str) -> str:
        c = folder_ops.with_prefix_suffix(folder_ops.replaced(c, find, replace), prefix, suffix)
        return folder_ops.first_tags(c, int(keep)) if keep else c

    return refresh(folder, f"Changed {counted(folder_ops.edit_all(Path(folder), edit))}.")


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


def cancel_button(job: CaptionJob | None) -> dict:
    """Cancel captioning: clickable only while a captioner runs."""
    return gr.update(interactive=bool(job and job.running))


def on_caption_cancel(job: CaptionJob | None, folder: str):
    """The poll keeps the job and ticks once more: a poll that read the job as running before the cancel may answer
    after it, and the next poll puts the final message back (QA: a stale "Captioning … n/24" stayed for good)."""
    if not job:
        return None, "Nothing is being captioned.", gr.Timer(active=False), gr.skip(), gr.skip()
    return job, job.cancel(), gr.Timer(active=True), gallery_items(folder), tag_table(folder)


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


def selection(folder: str, name: str, text: str, resolution, min_reso, max_reso, no_upscale, evt: gr.SelectData):
    """The picture clicked in the gallery (see picture_at), after the caption typed for the one before is saved;
    the message and the gallery change only then."""
    saved = pending_saved(folder, name, text)  # (folder, message, gallery, tags)
    shown = (saved[1], saved[2]) if saved else (gr.update(), gr.update())
    return *picture_at(folder, evt.index, resolution, min_reso, max_reso, no_upscale), *shown


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
    with gr.Accordion("Earlier datasets (open one again, or delete it)", open=False,
                      elem_id="dataset-earlier") as c.earlier:
        with gr.Row():
            c.earlier_choice = gr.Dropdown(label="Dataset", choices=[], scale=3, elem_id="dataset-earlier-choice")
            c.earlier_open = gr.Button("Open it", elem_id="dataset-earlier-open")
            c.earlier_delete = gr.Button(DELETE_DRAFT, variant="stop", elem_id="dataset-earlier-delete")
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
            c.caption_cancel = gr.Button("Cancel captioning", variant="stop", interactive=False,
                                         elem_id="dataset-caption-cancel")
        c.caption_status = gr.Markdown(elem_id="dataset-caption-status")
    with gr.Row():
        c.trigger = gr.Textbox(label="Trigger word (kept first in every caption)", elem_id="dataset-trigger",
                               scale=3)
        c.apply_trigger = gr.Button("Apply to all captions", elem_id="dataset-apply-trigger")
    c.gallery = gr.Gallery(label="Pictures and captions (click one to edit its caption)", columns=6, height=360,
                           allow_preview=False, elem_id="dataset-gallery")
    with gr.Row():  # the clicked picture: its caption to edit, and where it will be cropped, side by side
        with gr.Column(scale=3):
            c.selected = gr.Textbox(label="Selected picture", interactive=False, elem_id="dataset-selected")
            c.caption = gr.Textbox(label="Caption (Enter or Save caption keeps it)", elem_id="dataset-caption")
            c.save_caption = gr.Button("Save caption", elem_id="dataset-save-caption")
        c.crop = gr.Image(label="Crop preview (kept area outlined)", interactive=False, height=220, scale=1,
                          elem_id="dataset-crop-preview")
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
            c.keep = gr.Number(label="Keep the first N tags (0 = all)", value=0, elem_id="dataset-keep")
            c.bulk = gr.Button("Apply to every caption", elem_id="dataset-bulk-apply")
    c.applied = gr.State("")  # the trigger word in the captions' front, put there by on_trigger or the demo
    bind(c, Path(drafts), dataset_dir)
    return DatasetTab(trigger=c.trigger, gallery=c.gallery, check=c.check, health=c.health, selected=c.selected,
                      caption=c.caption, crop=c.crop, report=c.report, tags=c.tags, applied=c.applied)


def bind(c: SimpleNamespace, drafts: Path, dataset_dir: gr.State) -> None:
    shown, unselect = [dataset_dir, c.report, c.gallery, c.tags], [c.selected, c.caption, c.crop, c.health]
    applied = c.applied
    changed = [c.upload.upload(partial(on_upload, drafts), [c.upload, dataset_dir, applied], shown + [c.upload]),
               c.add_folder.click(partial(on_folder, drafts), [c.folder_path, dataset_dir, applied], shown),
               c.save_caption.click(on_save, [dataset_dir, c.selected, c.caption], shown),
               c.caption.submit(on_save, [dataset_dir, c.selected, c.caption], shown)]  # Enter saves too
    box = [dataset_dir, c.selected, c.caption]  # what keeping_edit saves first
    every_caption = [c.apply_trigger.click(keeping_edit(on_trigger), [*box, c.trigger, applied], shown + [applied]),
                     c.tag_apply.click(keeping_edit(on_tag), [*box, c.tag_from, c.tag_to], shown),
                     c.bulk.click(keeping_edit(on_bulk), [*box, c.prefix, c.suffix, c.find, c.replace, c.keep],
                                  shown)]
    for event in changed + every_caption:
        event.then(stale_health, c.health, c.health)
    for event in every_caption:
        event.then(caption_of, [dataset_dir, c.selected], c.caption)
    relist = partial(drafts_list, drafts)
    c.demo.click(partial(on_demo, drafts), None, shown + [c.trigger, applied]).then(no_selection, None, unselect).then(
        relist, dataset_dir, c.earlier_choice)
    armed = gr.State("")  # the earlier dataset the first click of Delete asked about
    c.earlier.expand(relist, dataset_dir, c.earlier_choice)
    c.earlier_choice.change(partial(confirm.disarmed, DELETE_DRAFT), None, [armed, c.earlier_delete])
    c.earlier_open.click(partial(on_open_draft, drafts), [c.earlier_choice, dataset_dir, applied],
                         shown + [applied, c.trigger]).then(
        no_selection, None, unselect).then(relist, dataset_dir, c.earlier_choice)
    c.earlier_delete.click(partial(on_delete_draft, drafts), [c.earlier_choice, dataset_dir, armed],
                           shown + [armed, c.earlier_delete]).then(
        lambda a, f: drafts_list(drafts, f) if not a else gr.update(), [armed, dataset_dir], c.earlier_choice)
    c.clear.click(on_clear, None, shown + [c.upload, applied, c.trigger]).then(no_selection, None, unselect).then(
        relist, dataset_dir, c.earlier_choice)

    job = gr.State(None)
    poll = gr.Timer(POLL_S, active=False)
    after = [job, c.caption_status, poll, c.gallery, c.tags]
    for event in (c.caption_run.click(on_caption_start, [job, dataset_dir, c.kind, c.source, c.overwrite],
                                      [job, c.caption_status, poll]),
                  poll.tick(on_caption_poll, [job, dataset_dir], after),
                  c.caption_cancel.click(on_caption_cancel, [job, dataset_dir], after)):
        event.then(cancel_button, job, c.caption_cancel)
