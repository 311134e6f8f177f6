"""thingsvision's extractor on an image folder, timed; run by extract_speed.py through the separate
thingsvision virtual environment's python (/work/tv-venv/bin/python), never featx's.

Usage: tv_runner.py JSON   (data, model, weights, layer, batch_size, resize, crop, device, out)
Prints one line: @@featx-bench@@ {"images_per_s": ..., ...}
"""

import json
import resource
import sys
import time

RESULT_TAG = "@@featx-bench@@ "


def main() -> int:
    job = json.loads(sys.argv[1])
    import thingsvision
    import torch
    from thingsvision import get_extractor
    from thingsvision.utils.data import DataLoader, ImageDataset
    from thingsvision.utils.storing import save_features

    device = job["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    extractor = get_extractor(
        model_name=job["model"],
        source="torchvision",
        device=device,
        pretrained=job["weights"].lower() != "none",
    )
    dataset = ImageDataset(
        root=job["data"],
        out_path=job["out"],
        backend=extractor.get_backend(),
        transforms=extractor.get_transformations(resize_dim=job["resize"], crop_dim=job["crop"]),
    )
    batches = DataLoader(dataset=dataset, batch_size=job["batch_size"], backend=extractor.get_backend())
    features = extractor.extract_features(batches=batches, module_name=job["layer"], flatten_acts=True)
    save_features(features, out_path=job["out"], file_format="npy")
    secs = time.perf_counter() - t
    n = len(features)
    print(
        RESULT_TAG
        + json.dumps(
            {
                "images_per_s": n / secs,
                "seconds": secs,
                "images": n,
                "version": thingsvision.__version__,
                "torch": torch.__version__,
                "tv_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
