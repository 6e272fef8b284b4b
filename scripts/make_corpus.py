#!/usr/bin/env python3
"""Writes the broken-input corpus of tests/data/corpus/ (SPEC 8; docs/reliability.md).

Deterministic and tiny (well under 50 KB in all). tests/test_corpus.cpp drives the real CLI on
each file; scripts/fuzz.sh uses the files as seeds. Re-run after changing it:
    python3 scripts/make_corpus.py            # writes tests/data/corpus/
"""
import gzip
import os
import shutil
import struct
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "corpus")
root = os.path.normpath(sys.argv[1] if len(sys.argv) > 1 else root)


def write(rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def idx_images(n, rows, cols, pixels=None, magic=2051):
    head = struct.pack(">IIII", magic, n, rows, cols)
    if pixels is None:
        pixels = bytes((i * 37 + (i // (rows * cols)) * 11) % 256 for i in range(n * rows * cols))
    return head + pixels


def idx_labels(n, labels=None, magic=2049):
    if labels is None:
        labels = bytes(i % 10 for i in range(n))
    return struct.pack(">II", magic, n) + labels


if os.path.isdir(root):
    shutil.rmtree(root)

# ---- A valid, tiny Fashion-MNIST-like directory (6 train, 4 test images of 28x28). The
# test copies it and swaps in one broken file per case.
N_TRAIN, N_TEST = 6, 4
train_images = idx_images(N_TRAIN, 28, 28)
write("idx/valid/train-images-idx3-ubyte", train_images)
write("idx/valid/train-labels-idx1-ubyte", idx_labels(N_TRAIN))
write("idx/valid/t10k-images-idx3-ubyte", idx_images(N_TEST, 28, 28))
write("idx/valid/t10k-labels-idx1-ubyte", idx_labels(N_TEST))

# ---- Broken IDX files. Name: <which file>.<defect>; the test puts each in place of
# train-images-idx3-ubyte / train-labels-idx1-ubyte (or t10k-*).
write("idx/images.empty", b"")
write("idx/images.header-truncated", train_images[:10])
write("idx/images.data-truncated", train_images[:16 + 28 * 28 * 2 + 100])
write("idx/images.trailing-bytes", train_images + b"\x00" * 7)
write("idx/images.wrong-magic", idx_images(N_TRAIN, 28, 28, magic=2049)[:200])  # a label magic
write("idx/images.text-file", b"this is not an IDX file, it is plain text\n")
write("idx/images.absurd-dims", struct.pack(">IIII", 2051, 1, 2**31, 2**31) + b"\x00" * 64)
write("idx/images.zero-count", struct.pack(">IIII", 2051, 0, 28, 28))
# Plausible header (10M images of 4096x4096 = 1.6e14 bytes) on a tiny file: must be refused
# from the file size, without allocating.
write("idx/images.huge-declared", struct.pack(">IIII", 2051, 10_000_000, 4096, 4096) + b"\x01" * 64)
# The same lie inside gzip: memory may only grow with the data actually present.
write("idx/images.huge-declared.gz",
      gzip.compress(struct.pack(">IIII", 2051, 10_000_000, 4096, 4096) + b"\x01" * 4096, mtime=0))
write("idx/labels.huge-declared", struct.pack(">II", 2049, 10_000_000) + b"\x01" * 16)  # pairs with the above
write("idx/images.corrupt-gzip", b"\x1f\x8b\x08\x00" + b"\xde\xad\xbe\xef" * 16)
write("idx/labels.empty", b"")
write("idx/labels.count-mismatch", idx_labels(N_TRAIN - 3))
write("idx/labels.wrong-magic", idx_labels(N_TRAIN, magic=2051))
write("idx/labels.truncated", idx_labels(N_TRAIN)[:8 + 5])

# ---- CIFAR-10 binary: records of 1 label byte + 3072 pixels.
rec = bytes([3]) + bytes(i % 251 for i in range(3072))
write("cifar/data_batch.truncated", rec + rec[:1000])
write("cifar/data_batch.short", rec[:100])
write("cifar/data_batch.empty", b"")
write("cifar/data_batch.bad-label", rec + bytes([200]) + rec[1:])
write("cifar/data_batch.valid", rec)  # fuzz seed only

# ---- Genotypes (JSON and DARTS text forms).
good_normal = [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["skip_connect", 0], ["sep_conv_3x3", 1],
               ["skip_connect", 0], ["dil_conv_3x3", 2], ["sep_conv_3x3", 1], ["max_pool_3x3", 0]]
good_reduce = [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],
               ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]]


def gjson(normal, reduce, extra=""):
    import json
    body = {"normal": normal, "normal_concat": [2, 3, 4, 5], "reduce": reduce,
            "reduce_concat": [2, 3, 4, 5]}
    return json.dumps(body) + extra + "\n"


def gtext(normal, reduce):
    e = lambda cell: ", ".join("('%s', %d)" % (o, i) for o, i in cell)
    return ("Genotype(normal=[%s], normal_concat=[2, 3, 4, 5], reduce=[%s], "
            "reduce_concat=[2, 3, 4, 5])\n" % (e(normal), e(reduce)))


bad_op = [list(x) for x in good_normal]
bad_op[3][0] = "conv_9x9_magic"
bad_index = [list(x) for x in good_normal]
bad_index[5][1] = 7  # node 2 may take inputs 0..3
write("genotype/valid.json", gjson(good_normal, good_reduce))  # fuzz seed only
write("genotype/valid.txt", gtext(good_normal, good_reduce))   # fuzz seed only
write("genotype/unknown-op.json", gjson(bad_op, good_reduce))
write("genotype/unknown-op.txt", gtext(bad_op, good_reduce))
write("genotype/bad-index.json", gjson(bad_index, good_reduce))
write("genotype/bad-index.txt", gtext(bad_index, good_reduce))
write("genotype/negative-index.txt", gtext(good_normal[:7] + [["max_pool_3x3", -1]], good_reduce))
write("genotype/malformed.json", gjson(good_normal, good_reduce)[:-20])
write("genotype/malformed.txt", "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3'\n")
write("genotype/odd-edges.json", gjson(good_normal[:7], good_reduce))
write("genotype/empty.json", b"")
write("genotype/empty.txt", b"")

# ---- Search configuration files (--config).
write("config/malformed.json", '{"epochs": 1, "batch_size": \n')
write("config/unknown-key.json", '{"epochs": 1, "epochz": 2}\n')
write("config/wrong-type.json", '{"epochs": "ten"}\n')
write("config/wrong-type-nested.json", '{"noise": {"lambda": [0.2]}}\n')
write("config/not-object.json", '[1, 2, 3]\n')
write("config/empty.json", b"")
write("config/bad-value.json", '{"train_portion": 1.5}\n')

# ---- Checkpoints that are not checkpoints (real but incompatible ones are made by the test).
write("checkpoint/garbage.pt", b"PK\x03\x04 this is not a zip archive at all" + bytes(range(64)))
write("checkpoint/empty.pt", b"")

total = 0
for d, _, files in os.walk(root):
    total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
print("corpus: %s, %d bytes" % (root, total))
assert total < 50_000, total
