#!/usr/bin/env python3
"""Streams a video to a cvserve model over gRPC (the Open Inference Protocol's
ModelStreamInfer), handing frames over in system shared memory: no JPEG encoding, no copy
in the request, no decoding on the server.

Frames are read with OpenCV from a video file, a camera index or an RTSP URL, converted to
RGB and written into one of two slots of a shared-memory region (double buffering: a slot
is rewritten only once the server has answered the frame in it). Each request names its
slot; answers come back on the stream in order.

    pip install "tritonclient[grpc]" numpy opencv-python-headless
    python examples/video_client.py --source video.mp4 --model coco
    python examples/video_client.py --source 0 --model coco --draw out.mp4
    python examples/video_client.py --source rtsp://camera/stream --model coco --frames 300

Prints the frame rate and latency; `--json` prints each frame's predictions as a JSON line.
The server must be on this machine (shared memory); `--no-shm` sends the pixels in the
request instead.
"""
import argparse
import json
import os
import queue
import sys
import threading
import time

import cv2
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

SLOTS = 2


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:9002", help="cvserve's gRPC address")
    ap.add_argument("--model", required=True, help="model name (the dataset: coco for coco/1)")
    ap.add_argument("--version", default="", help="model version (default: the highest loaded)")
    ap.add_argument("--source", required=True, help="video file, camera index, or RTSP URL")
    ap.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: all)")
    ap.add_argument("--confidence", type=float, default=None)
    ap.add_argument("--draw", help="write the video with the detections drawn to this file")
    ap.add_argument("--json", action="store_true", help="print each frame's answer as JSON")
    ap.add_argument("--no-shm", action="store_true", help="send pixels in the request")
    return ap.parse_args()


def open_source(source):
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        sys.exit(f"cannot open {source}")
    return cap


def draw(frame_bgr, predictions):
    for p in predictions:
        x0, y0 = int(p["x"] - p["width"] / 2), int(p["y"] - p["height"] / 2)
        x1, y1 = int(p["x"] + p["width"] / 2), int(p["y"] + p["height"] / 2)
        cv2.rectangle(frame_bgr, (x0, y0), (x1, y1), (0, 255, 0), 2)
        label = f'{p["class"]} {p["confidence"]:.2f}'
        cv2.putText(frame_bgr, label, (x0, max(y0 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 255, 0), 1)
    return frame_bgr


def main():
    args = parse_args()
    cap = open_source(args.source)
    ok, first = cap.read()
    if not ok:
        sys.exit("the source has no frames")
    height, width = first.shape[:2]
    frame_bytes = width * height * 3
    client = grpcclient.InferenceServerClient(url=args.url)

    region = f"video_{os.getpid()}"
    handle = None
    if not args.no_shm:
        key = f"/cvserve_video_{os.getpid()}"
        handle = shm.create_shared_memory_region(region, key, frame_bytes * SLOTS)
        client.register_system_shared_memory(region, key, frame_bytes * SLOTS)

    free = [threading.Semaphore(1) for _ in range(SLOTS)]
    answers = queue.Queue()
    sent = {}
    failed = []

    def on_answer(result, error):
        # Called in order, one answer per request.
        answers.put((result, error, time.perf_counter()))

    writer = None
    if args.draw:
        fps = cap.get(cv2.CAP_PROP_FPS) or 25
        writer = cv2.VideoWriter(args.draw, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    params = {} if args.confidence is None else {"confidence": args.confidence}
    latencies = []
    done = threading.Event()
    kept = {}

    def consume():
        while not (done.is_set() and len(latencies) == len(sent)):
            try:
                result, error, at = answers.get(timeout=0.1)
            except queue.Empty:
                continue
            if error is not None:
                failed.append(str(error))
                for slot in free:  # unblock the reader, which then stops
                    slot.release()
                return
            frame_id = int(result.get_response().id)
            slot = frame_id % SLOTS
            free[slot].release()
            latencies.append(at - sent[frame_id])
            predictions = json.loads(result.as_numpy("predictions")[0])
            if args.json:
                print(json.dumps({"frame": frame_id, "answer": predictions}), flush=True)
            if writer is not None:
                writer.write(draw(kept.pop(frame_id), predictions["predictions"]))

    consumer = threading.Thread(target=consume)
    consumer.start()
    started = time.perf_counter()
    try:
        client.start_stream(callback=on_answer)
        frame_id, frame = 0, first
        while frame is not None and (args.frames == 0 or frame_id < args.frames):
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            slot = frame_id % SLOTS
            free[slot].acquire()  # the server has answered the frame last in this slot
            if failed:
                break
            inp = grpcclient.InferInput("pixels", [1, height, width, 3], "UINT8")
            if handle is not None:
                shm.set_shared_memory_region(handle, [rgb], offset=slot * frame_bytes)
                inp.set_shared_memory(region, frame_bytes, offset=slot * frame_bytes)
            else:
                inp.set_data_from_numpy(rgb[np.newaxis])
            if writer is not None:
                kept[frame_id] = frame
            sent[frame_id] = time.perf_counter()
            client.async_stream_infer(
                args.model, [inp], model_version=args.version, request_id=str(frame_id),
                parameters=params,
            )
            frame_id += 1
            ok, frame = cap.read()
            if not ok:
                frame = None
    finally:
        done.set()
        consumer.join(timeout=30)
        client.stop_stream()
        if handle is not None:
            client.unregister_system_shared_memory(region)
            shm.destroy_shared_memory_region(handle)
        if writer is not None:
            writer.release()
    elapsed = time.perf_counter() - started
    if failed:
        sys.exit(f"the server refused a frame: {failed[0]}")
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    print(
        f"{len(lat)} frames in {elapsed:.2f} s: {len(lat) / elapsed:.1f} fps, "
        f"latency p50 {p50:.1f} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
