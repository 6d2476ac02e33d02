"""Writes the video client's test video: 4 frames of each fixture photo (640x480, lossless FFV1
via OpenCV), and each scene's frame as a PNG, for the test to send to the Roboflow route.

Usage: make_test_video.py FIXTURES_DIR OUT_DIR. Prints the frame count.
"""
import os
import sys

import cv2

fixtures, out = sys.argv[1], sys.argv[2]
scenes = ["images/giraffe.jpg", "images/horses.jpg"]
# FFV1 is lossless: each frame decodes to the PNG exactly, so answers must match exactly.
writer = cv2.VideoWriter(os.path.join(out, "video.avi"), cv2.VideoWriter_fourcc(*"FFV1"), 10, (640, 480))
count = 0
for i, scene in enumerate(scenes):
    frame = cv2.resize(cv2.imread(os.path.join(fixtures, scene)), (640, 480))
    cv2.imwrite(os.path.join(out, f"scene{i}.png"), frame)
    for _ in range(4):
        writer.write(frame)
        count += 1
writer.release()
print(count)
