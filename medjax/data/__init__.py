"""Medical image data for medjax: readers, dataset indices, prompts, phantoms, input pipeline.

Training uses two calls:

  config.data = medjax.data.default_config()
  it = medjax.data.make_dataset(config.data, 'train', batch_size, seed=0, resolution=512,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  batch = next(it)   # image f32 [B, H, W, 3] in [-1, 1] (NHWC), prompt str [B], label i32 [B],
                     # labels f32 [B, L], label_mask bool [B, L], key str [B]
  state = it.get_state()   # JSON-able; it.set_state(state) resumes exactly (orbax-compatible)

Sources (`config.data.source`, root in `config.data.root`):
  ''        in-memory phantoms (default): chest X-rays or 3-channel prostate MRI, exact labels.
  chexpert  root/{train,valid}.csv, Path column relative to root or its parent.
  mimic     root/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz + root/files/p../p<sid>/s<study>/
            <dicom_id>.jpg; optional reports (FINDINGS / IMPRESSION) for prompts.
  picai     root/images/<pid>/<pid>_<sid>_{t2w,adc,hbv}.mha, marksheet.csv, <pid>_<sid>.nii.gz
            masks -> axial slices (R=T2W, G=ADC, B=HBV), labelled by csPCa lesion voxels.
  folder    root/<class>/*.{png,jpg,dcm,nii.gz,mha} (+ optional <name>.txt captions).

Selection: `classes` ((('pleural_effusion', {'Pleural Effusion': 1}), ('no_finding',
{'No Finding': 1}))), `per_class` (paper A: 100), patient-level `split` (mode 'random'
fractions, 'sizes' e.g. 200/200/200, or the dataset's own 'source' split). Bad files:
`on_bad_file` 'error' raises MedjaxError naming the file; 'skip' drops it and counts it once
however often it is re-read (`it.num_skipped`, `it.skip_report()`), up to `max_bad_fraction`.

Lower-level pieces: `read_image(path)` (DICOM, PNG/JPEG 8/16 bit, NIfTI, MHA/MHD/NRRD -> float32
[0, 1]), `load_chexpert` / `load_mimic` / `load_picai` / `load_folder` (indices of `Record`),
`make_prompt`, `phantoms.chest_xray` / `phantoms.prostate_mri`, and the writer
`python -m medjax.data.make_phantoms --kind=cxr|mri --num=N --out=DIR`.
"""
from medjax.data.chexpert import load_chexpert
from medjax.data.defaults import default_config
from medjax.data.folder import load_folder
from medjax.data.labels import CHEXPERT_LABELS
from medjax.data.loader import DataIterator
from medjax.data.loader import make_dataset
from medjax.data.loader import select_records
from medjax.data.mimic import load_mimic
from medjax.data.phantoms import chest_xray
from medjax.data.phantoms import prostate_mri
from medjax.data.picai import load_picai
from medjax.data.prompts import make_prompt
from medjax.data.read_image import read_image
from medjax.data.read_image import read_volume
from medjax.data.records import DataIndex
from medjax.data.records import Record
from medjax.data.reports import extract_sections
from medjax.data.sources import load_index
from medjax.data.sources import phantom_index

__all__ = [
    "CHEXPERT_LABELS", "DataIndex", "DataIterator", "Record", "chest_xray", "default_config",
    "extract_sections", "load_chexpert", "load_folder", "load_index", "load_mimic", "load_picai",
    "make_dataset", "make_prompt", "phantom_index", "prostate_mri", "read_image", "read_volume",
    "select_records",
]
