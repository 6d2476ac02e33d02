"""Browser and OpenAPI checks of a running cvserve (driven by tests/web_page.rs).

    web_check.py BASE_URL IMAGE SCREENSHOT

1. /openapi.json parses and validates as OpenAPI 3 (openapi-spec-validator) and lists the
   three /infer/* routes and the legacy route.
2. Headless Chromium opens /, picks coco/1, uploads IMAGE, waits for the answer, and checks
   that the results list the dog and that the canvas is not blank; saves SCREENSHOT.
3. A workflow definition pasted into the page (image_slicer -> coco/1 on the tiles ->
   detections_stitch -> bounding_box_visualization) runs on the same photo: the drawn image
   is shown as a picture of the photo's size, the detections as JSON listing the dog.
4. /docs renders the document (Redoc, served by cvserve itself).
Prints "web check: ok" on success; raises otherwise.
"""

import json
import os
import shutil
import sys
import urllib.request

from openapi_spec_validator import validate
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait


def main():
    base, image, screenshot = sys.argv[1], sys.argv[2], sys.argv[3]

    with urllib.request.urlopen(base + "/openapi.json", timeout=30) as r:
        doc = json.load(r)
    validate(doc)
    assert doc["openapi"].startswith("3."), doc["openapi"]
    for path in ("/infer/object_detection", "/infer/instance_segmentation",
                 "/infer/classification", "/{dataset_id}/{version_id}"):
        assert path in doc["paths"], f"{path} missing from {sorted(doc['paths'])}"
    req = doc["components"]["schemas"]["InferRequest"]["properties"]
    assert req["confidence"]["default"] == 0.4 and req["response_mask_format"]["default"] == "polygon"
    print("openapi: valid, %d paths" % len(doc["paths"]))

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a driver
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(base + "/")
        wait.until(lambda d: any(o.get_attribute("value") == "coco/1"
                                 for o in d.find_elements(By.CSS_SELECTOR, "#model option")))
        Select(driver.find_element(By.ID, "model")).select_by_value("coco/1")
        driver.find_element(By.ID, "file").send_keys(os.path.abspath(image))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "round trip"))
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")]
        assert any(r.startswith("dog") for r in rows), rows
        # Not blank: the canvas holds the photo (many distinct colours) at its own size.
        distinct = driver.execute_script("""
            const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 97) seen.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
            return [seen.size, c.width, c.height];
        """)
        assert distinct[0] > 500 and distinct[1] > 300, distinct
        os.makedirs(os.path.dirname(screenshot), exist_ok=True)
        driver.save_screenshot(screenshot)
        print("page: rows %s, canvas %s" % (rows, distinct))

        # A workflow pasted into the page, run on the photo already picked.
        definition = {
            "version": "1.0",
            "inputs": [{"type": "WorkflowImage", "name": "image"}],
            "steps": [
                {"type": "roboflow_core/image_slicer@v2", "name": "tiles", "image": "$inputs.image",
                 "slice_width": 480, "slice_height": 480},
                {"type": "roboflow_core/roboflow_object_detection_model@v2", "name": "detect",
                 "images": "$steps.tiles.slices", "model_id": "coco/1"},
                {"type": "roboflow_core/detections_stitch@v1", "name": "stitch",
                 "reference_image": "$inputs.image", "predictions": "$steps.detect.predictions"},
                {"type": "roboflow_core/bounding_box_visualization@v1", "name": "boxes",
                 "image": "$inputs.image", "predictions": "$steps.stitch.predictions"},
            ],
            "outputs": [
                {"type": "JsonField", "name": "drawn", "selector": "$steps.boxes.image"},
                {"type": "JsonField", "name": "stitched", "selector": "$steps.stitch.predictions"},
            ],
        }
        box = driver.find_element(By.ID, "wf-definition")
        assert "roboflow_core/" in box.get_attribute("value"), "no example definition"
        driver.execute_script(
            "const t = arguments[0]; t.value = arguments[1];"
            "t.dispatchEvent(new Event('input', {bubbles: true}));", box, json.dumps(definition))
        driver.find_element(By.ID, "wf-run").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "wf-status"), "round trip"))
        status = driver.find_element(By.ID, "wf-status").text
        assert status.startswith("1 image"), status
        size = wait.until(lambda d: d.execute_script("""
            const img = document.querySelector('#wf-outputs img.wf-image');
            return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;
        """))
        assert size == [768, 576], size
        shown = json.loads(driver.find_element(By.ID, "wf-json").text)
        assert shown[0]["drawn"] == "<image: [0].drawn>", shown[0]["drawn"]
        classes = [p["class"] for p in shown[0]["stitched"]["predictions"]]
        assert "dog" in classes, classes
        driver.execute_script("document.getElementById('workflow').scrollIntoView()")
        driver.save_screenshot(screenshot.replace(".png", "-workflow.png"))
        print("workflow: %s, image %s, classes %s" % (status, size, classes))

        driver.get(base + "/docs")
        wait.until(lambda d: "/infer/object_detection" in d.page_source
                   and d.find_elements(By.CSS_SELECTOR, "h1"))
        print("docs: rendered")
    finally:
        driver.quit()
    print("web check: ok")


if __name__ == "__main__":
    main()
