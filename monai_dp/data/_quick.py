import os, json, numpy as np, nibabel as nib
import torch
from monai.transforms import MapTransform
def make_synthetic_dataset(out_dir, task, spatial_dims, num_items=40, size=None, num_classes=2, seed=0, patients=True):
    from monai.data import create_test_image_2d, create_test_image_3d
    out_dir = str(out_dir)
    if os.path.exists(os.path.join(out_dir, "dataset.json")): return out_dir
    os.makedirs(out_dir, exist_ok=True)
    size = size or (64 if spatial_dims == 2 else 32)
    rs = np.random.RandomState(seed); recs = []
    for i in range(num_items):
        if task == "segmentation":
            f = create_test_image_2d if spatial_dims == 2 else create_test_image_3d
            img, seg = f(*([size] * spatial_dims), num_objs=3, rad_max=max(size // 6, 7), num_seg_classes=1, random_state=rs)
            nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), f"{out_dir}/img{i}.nii.gz")
            nib.save(nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), f"{out_dir}/seg{i}.nii.gz")
            recs.append({"image": f"img{i}.nii.gz", "label": f"seg{i}.nii.gz", "patient_id": f"p{i//2}"})
        else:
            label = i % num_classes
            img = rs.normal(size=[size] * spatial_dims).astype(np.float32)
            if label:
                c = size // 2; idx = np.indices([size] * spatial_dims)
                img += 1.0 * (sum((x - c) ** 2 for x in idx) < (size // 5) ** 2)
            nib.save(nib.Nifti1Image(img, np.eye(4)), f"{out_dir}/img{i}.nii.gz")
            recs.append({"image": f"img{i}.nii.gz", "label": label, "patient_id": f"p{i//2}"})
    n_test = max(2, num_items // 10)
    json.dump({"training": recs[:-n_test], "test": recs[-n_test:]}, open(f"{out_dir}/dataset.json", "w"))
    return out_dir
def _npz(path):
    z = np.load(path)
    out = {}
    for split, key in (("training", "train"), ("validation", "val"), ("test", "test")):
        x = z[f"{key}_images"]; y = z[f"{key}_labels"].reshape(-1)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        out[split] = [{"image": x[i][None], "label": int(y[i])} for i in range(len(x))]
    return out
def load_datalist(dataset_dir, task, num_classes, spatial_dims, val_fraction=0.2, test_fraction=0.0, seed=0, check="header"):
    if str(dataset_dir).endswith(".npz"): return _npz(dataset_dir)
    d = json.load(open(os.path.join(dataset_dir, "dataset.json")))
    def fix(r):
        r = dict(r)
        for k in ("image", "label"):
            if isinstance(r.get(k), str): r[k] = os.path.join(dataset_dir, r[k])
        return r
    tr = [fix(r) for r in d["training"]]; te = [fix(r) for r in d.get("test", [])]
    n_val = max(1, int(len(tr) * val_fraction))
    return {"training": tr[n_val:], "validation": tr[:n_val], "test": te}
class CheckLabelRanged(MapTransform):
    def __init__(self, keys, num_classes, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys); self.num_classes = num_classes
    def __call__(self, data): return dict(data)
