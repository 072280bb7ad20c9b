"""Dataset tab: drop pictures (or a zip, or give a folder), see them with their captions, caption, edit, tag."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from datasets_tools import dataset_folder as folder_ops

DEMO_DATASET = Path(__file__).resolve().parent.parent / "demo" / "dataset"


@dataclass
class DatasetTab:
    trigger: gr.Textbox
    gallery: gr.Gallery
    check: gr.Button
    health: gr.Markdown
    selected: gr.Textbox
    caption: gr.Textbox
    crop: gr.Image


def gallery_items(folder: str) -> list[tuple[str, str]]:
    if not folder:
        return []
    return [(str(item.image), item.caption or "(no caption)") for item in folder_ops.items(Path(folder))]


def tag_table(folder: str) -> list[list]:
    if not folder:
        return []
    freq = folder_ops.tag_frequency(Path(folder))
    return [[tag, count] for tag, count in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]


def build(drafts: Path, dataset_dir: gr.State) -> DatasetTab:
    with gr.Row():
        upload = gr.File(label="Drop pictures or a .zip here", file_count="multiple", elem_id="dataset-upload",
                         scale=3)
        with gr.Column(scale=2):
            folder_path = gr.Textbox(label="…or a folder on this machine", elem_id="dataset-folder")
            add_folder = gr.Button("Add folder", elem_id="dataset-add-folder")
            try_demo = gr.Button("Try the demo dataset", elem_id="dataset-demo",
                                 visible=DEMO_DATASET.is_dir())
            clear = gr.Button("Start over", elem_id="dataset-clear")
    report = gr.Markdown(elem_id="dataset-report")
    with gr.Accordion("Caption the pictures", open=False, elem_id="dataset-captioner"):
        with gr.Row():
            captioner_kind = gr.Dropdown(choices=[("WD14 tagger (tags, for anime / illustration)", "wd14"),
                                                  ("BLIP (a sentence)", "blip"),
                                                  ("Florence-2 (a detailed sentence)", "florence2")],
                                         value="wd14", label="Captioner", elem_id="dataset-captioner-kind")
            captioner_source = gr.Textbox(label="Model folder (or hub id when online; empty = the default)",
                                          elem_id="dataset-captioner-source", scale=2)
            overwrite = gr.Checkbox(label="Replace existing captions", value=False, elem_id="dataset-overwrite")
        run_captioner = gr.Button("Caption", elem_id="dataset-caption-run")
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word (kept first in every caption)", elem_id="dataset-trigger", scale=3)
        apply_trigger = gr.Button("Apply to all captions", elem_id="dataset-apply-trigger")
    gallery = gr.Gallery(label="Pictures and captions (click one to edit its caption)", columns=6, height=360,
                         allow_preview=False, elem_id="dataset-gallery")
    with gr.Row():
        selected = gr.Textbox(label="Selected picture", interactive=False, elem_id="dataset-selected", scale=2)
        caption = gr.Textbox(label="Caption", elem_id="dataset-caption", scale=4)
        save_caption = gr.Button("Save caption", elem_id="dataset-save-caption")
    with gr.Row():
        check = gr.Button("Check the dataset (health report and buckets)", elem_id="dataset-check")
    health = gr.Markdown(elem_id="dataset-health")
    with gr.Accordion("Tags", open=False, elem_id="dataset-tags"):
        tags = gr.Dataframe(headers=["tag", "count"], interactive=False, elem_id="dataset-tag-table")
        with gr.Row():
            tag_from = gr.Textbox(label="Tag", elem_id="dataset-tag-from")
            tag_to = gr.Textbox(label="Rename to (empty = remove)", elem_id="dataset-tag-to")
            tag_apply = gr.Button("Rename / remove in every caption", elem_id="dataset-tag-apply")
        with gr.Row():
            prefix = gr.Textbox(label="Add tags at the front", elem_id="dataset-prefix")
            suffix = gr.Textbox(label="Add tags at the end", elem_id="dataset-suffix")
            find = gr.Textbox(label="Find", elem_id="dataset-find")
            replace = gr.Textbox(label="Replace with", elem_id="dataset-replace")
            keep = gr.Number(label="Keep the first N tags (0 = all)", value=0, precision=0, elem_id="dataset-keep")
            bulk = gr.Button("Apply to every caption", elem_id="dataset-bulk-apply")
    crop = gr.Image(label="Crop preview of the selected picture (kept area outlined)", interactive=False,
                    height=256, elem_id="dataset-crop-preview")

    def ensure(folder: str) -> Path:
        if folder:
            return Path(folder)
        path = drafts / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        return path

    def refresh(folder: str, message: str):
        return folder, message, gallery_items(folder), tag_table(folder)

    def on_upload(files, folder):
        if not files:
            return refresh(folder, "")
        target = ensure(folder)
        result = folder_ops.add_files([Path(f) for f in files], target)
        return refresh(str(target), result.to_markdown())

    def on_folder(path, folder):
        if not path or not Path(path).expanduser().is_dir():
            return refresh(folder, f"⚠ {path!r} is not a folder on this machine")
        target = ensure(folder)
        result = folder_ops.add_files([Path(path).expanduser()], target)
        return refresh(str(target), result.to_markdown())

    def on_demo(folder):
        target = ensure("")
        result = folder_ops.add_files([DEMO_DATASET], target)
        trigger_word = folder_ops.first_tag(target)
        return (*refresh(str(target), result.to_markdown()), trigger_word)

    outputs = [dataset_dir, report, gallery, tags]
    upload.upload(on_upload, [upload, dataset_dir], outputs)
    add_folder.click(on_folder, [folder_path, dataset_dir], outputs)
    try_demo.click(on_demo, dataset_dir, outputs + [trigger])
    clear.click(lambda: ("", "", [], []), None, outputs)

    def on_caption(folder, kind, source, replace, progress=gr.Progress()):
        from PIL import Image

        from datasets_tools.captioners import CaptionerUnavailable, load_captioner

        if not folder:
            return refresh(folder, "Add pictures first.")
        todo = [i for i in folder_ops.items(Path(folder)) if replace or not i.caption]
        if not todo:
            return refresh(folder, "Every picture has a caption (tick “Replace existing captions” to redo them).")
        try:
            captioner = load_captioner(kind, source.strip() or None)
        except (CaptionerUnavailable, OSError) as e:
            return refresh(folder, f"⚠ {e}")
        progress(0, desc=f"Captioning {len(todo)} pictures")
        texts = captioner.caption([Image.open(i.image) for i in todo],
                                  progress=lambda done, total: progress(done / total, desc=f"{done}/{total}"))
        for item, text in zip(todo, texts):
            folder_ops.set_caption(item.image, text)
        return refresh(folder, f"Captioned {len(todo)} pictures with {kind}.")

    run_captioner.click(on_caption, [dataset_dir, captioner_kind, captioner_source, overwrite], outputs)

    def on_bulk(folder, pre, post, old, new, n):
        if not folder:
            return refresh(folder, "Add pictures first.")

        def edit(c: str) -> str:
            c = folder_ops.with_prefix_suffix(folder_ops.replaced(c, old, new), pre, post)
            return folder_ops.first_tags(c, int(n)) if n else c

        return refresh(folder, f"Changed {folder_ops.edit_all(Path(folder), edit)} captions.")

    bulk.click(on_bulk, [dataset_dir, prefix, suffix, find, replace, keep], outputs)

    def on_save(folder, name, text):
        if not folder or not name:
            return refresh(folder, "Select a picture first.")
        folder_ops.set_caption(Path(folder) / name, text)
        return refresh(folder, f"Saved the caption of {name}.")

    save_caption.click(on_save, [dataset_dir, selected, caption], outputs)

    def on_trigger(folder, word):
        if not folder:
            return refresh(folder, "Add pictures first.")
        n = folder_ops.apply_trigger(Path(folder), word)
        return refresh(folder, f"“{word}” is first in {n} captions.")

    apply_trigger.click(on_trigger, [dataset_dir, trigger], outputs)

    def on_tag(folder, old, new):
        if not folder or not old:
            return refresh(folder, "Name a tag first.")
        n = folder_ops.rename_tag(Path(folder), old, new)
        verb = f"renamed to “{new}”" if new else "removed"
        return refresh(folder, f"“{old}” {verb} in {n} captions.")

    tag_apply.click(on_tag, [dataset_dir, tag_from, tag_to], outputs)
    return DatasetTab(trigger=trigger, gallery=gallery, check=check, health=health, selected=selected,
                      caption=caption, crop=crop)


def selection(folder: str, resolution, min_reso, max_reso, no_upscale, evt: gr.SelectData):
    """The picture clicked in the gallery: its name, its caption and where it will be cropped."""
    from PIL import Image

    from datasets_tools import buckets

    items = folder_ops.items(Path(folder)) if folder else []
    if evt.index is None or evt.index >= len(items):
        return "", "", None
    item = items[evt.index]
    with Image.open(item.image) as im:
        grid = buckets.make_buckets(int(resolution), int(min_reso), int(max_reso))
        bucket = buckets.bucket_for_image(im.width, im.height, grid, bool(no_upscale))
        preview = buckets.crop_preview(im, bucket)
    return str(item.image.relative_to(folder)), item.caption, preview


def health_markdown(folder: str, resolution, min_reso, max_reso, batch) -> str:
    """The health report at the Train tab's resolution and batch size."""
    from datasets_tools.health import report

    if not folder:
        return "Add pictures first."
    r = report(Path(folder), int(resolution), int(min_reso), int(max_reso), int(batch))
    return f"At {int(resolution)} px, batch {int(batch)}:\n\n" + r.to_markdown()
