"""`default_config()`: every data option in one ConfigDict (becomes `config.data`)."""
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Data options; the defaults train on in-memory chest X-ray phantoms, no files needed."""
  c = ml_collections.ConfigDict()
  c.source = ""  # '' (synthetic phantoms) | 'chexpert' | 'mimic' | 'picai' | 'folder'
  c.root = ""  # dataset root directory (unused for phantoms)
  c.on_bad_file = "error"  # 'error': stop at the first bad file; 'skip': count, report, go on
  # 'skip' stops with one error when more than this share of a data pass (or, shuffled, of the
  # files read so far, from 256 reads on) is bad. Half: a partial download or some corrupt files
  # still train on the rest; more than half bad is a wrong root or format, not a few bad files
  # (and an all-bad set stops within half a pass instead of skipping forever).
  c.max_bad_fraction = 0.5
  c.check_files = True  # stat every indexed image up front (CheXpert, MIMIC)

  c.phantoms = ml_collections.ConfigDict()
  c.phantoms.kind = "cxr"  # 'cxr' | 'mri' | 'cxr+mri' (alternating, one label set)
  c.phantoms.num = 600  # phantom images in the pool (before splits)
  c.phantoms.seed = 0
  c.phantoms.effusion_fraction = 0.5  # cxr: share with pleural effusion
  c.phantoms.cardiomegaly_fraction = 0.2  # cxr
  c.phantoms.lesion_fraction = 0.5  # mri: share of slices through a csPCa lesion

  c.chexpert = ml_collections.ConfigDict()
  c.chexpert.frontal_only = True
  c.chexpert.views = ()  # e.g. ('AP', 'PA'); () keeps all
  c.chexpert.uncertainty = "zeros"  # -1 cells: 'ones' | 'zeros' | 'ignore'
  c.chexpert.blank = "zeros"  # blank cells: 'zeros' | 'ignore'

  c.mimic = ml_collections.ConfigDict()
  c.mimic.views = ("PA", "AP")  # ViewPosition filter; () keeps all
  c.mimic.uncertainty = "zeros"
  c.mimic.blank = "zeros"
  c.mimic.reports = False  # attach FINDINGS / IMPRESSION (needed for prompt.kind='report')
  c.mimic.reports_dir = ""  # root of files/pXX/pSID/sSTUDY.txt; '' = root

  c.picai = ml_collections.ConfigDict()
  c.picai.spacing = (3.0, 0.5, 0.5)  # z, y, x mm, onto the T2W frame
  c.picai.crop = (30, 300, 300)  # z, y, x voxels, centre crop
  c.picai.percentiles = (1.0, 99.9)  # per-channel intensity scaling to [0, 1]
  c.picai.lesion_threshold = 1.0  # mask values >= this are csPCa
  c.picai.max_angle_deg = 10.0  # series orientations may differ by at most this
  c.picai.marksheet = ""  # '' = the marksheet.csv found under root
  c.picai.masks_dir = ""  # '' = search root for <patient>_<study>.nii.gz
  c.picai.cache_dir = ""  # processed-study cache (.npy); strongly advised for real data

  c.folder = ml_collections.ConfigDict()
  c.folder.class_from_subdir = True
  c.folder.modality = "medical image"

  # Classes, in order, as (name, {label: 1 or 0, ...}) pairs: (('pleural_effusion',
  # {'Pleural Effusion': 1}), ('no_finding', {'No Finding': 1})) (paper A) or (('diseased',
  # {'csPCa': 1}), ('healthy', {'csPCa': 0})) (PI-CAI). () = no classes (label = -1).
  c.classes = ()
  c.per_class = 0  # paper A: 100 images per class; 0 = all
  c.per_class_splits = ("train",)  # the splits the per-class cap applies to
  # Keep only these classes (after the split and the per-class choice, so the kept images are
  # the same as in a run over all classes): one textual-inversion token per run. () = all.
  c.keep_classes = ()

  c.split = ml_collections.ConfigDict()
  c.split.mode = "random"  # 'random' (fractions) | 'sizes' | 'source' (dataset's own split)
  c.split.fractions = (0.8, 0.1, 0.1)  # train, val, test shares of images, patient-level
  c.split.sizes = (200, 200, 200)  # mode 'sizes' (paper A's classifier splits)
  c.split.seed = 0  # split and per-class choice; independent of the training seed
  # A split file (JSON, medjax.data.split_file): computed and written on first use, then read
  # by every stage (generator training and evaluation share one split). '' = split in memory.
  c.split.file = ""
  # mode 'source' on a download without a test split (CheXpert-v1.0-small: train.csv + valid.csv):
  # 'val' = the source's val split is the test split and val is a seeded patient-level
  # `source_val_fraction` of the source's train split; '' = the dataset's own test split
  c.split.source_test = ""
  c.split.source_val_fraction = 0.1

  c.prompt = ml_collections.ConfigDict()
  c.prompt.kind = "labels"  # 'class' | 'labels' | 'report' | 'token' | 'fixed'
  c.prompt.class_prompts = ml_collections.ConfigDict({
      "pleural_effusion": "a chest x-ray with pleural effusion", "no_finding": "no finding"})
  c.prompt.class_template = "a {modality} with {class_text}"
  c.prompt.labels_template = "a {modality} with {labels}"
  c.prompt.no_labels_text = "a {modality} with no finding"
  c.prompt.label_texts = ml_collections.ConfigDict(
      {"csPCa": "clinically significant prostate cancer"})
  c.prompt.report_section = "impression"  # 'impression' | 'findings' | 'findings+impression'
  c.prompt.report_template = "{text}"
  c.prompt.max_words = 60  # keep report prompts within CLIP's 77 tokens; 0 = no limit
  c.prompt.token = "<lungxray>"
  c.prompt.token_template = "a photo of a {token}"
  c.prompt.fixed = ""

  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.resize = "crop"  # 'crop' (shorter side, then crop) | 'pad' | 'stretch'
  c.pipeline.crop = "center"  # 'center' | 'random' (seeded per example)
  c.pipeline.flip = False  # horizontal flips swap anatomy sides: off for radiographs
  c.pipeline.shuffle_splits = ("train",)  # splits that are shuffled (and repeated forever)
  c.pipeline.worker_count = 0  # worker processes (grain mp_prefetch); 0 = in-process
  c.pipeline.read_threads = 2  # decoding threads per process
  c.pipeline.prefetch = 16  # elements buffered by the read threads
  return c
