"""What video does the sandbox serve? A tiny, valid, deterministic MP4, written in pure Python.

RunComfy's video models answer ``output.video`` (or ``output.videos``) with URLs of MP4
files (its ComfyUI nodes read them so: runcomfy/execution.py ``output_video``). The
sandbox's stand-in is an ISO base media file (``ftyp``, ``mdat``, ``moov``) holding one
H.264 track, Constrained Baseline, 32x32 at 10 frames a second for one second. Each
frame is an IDR picture of I_PCM macroblocks: raw samples, so no entropy coder is
needed, and any H.264 decoder shows it. The picture (a bar sweeping across, in a
colour taken from the path) differs by path, so each job's file has its own bytes.
"""

from __future__ import annotations

import hashlib
import struct

__all__ = ["make_mp4"]

_SIDE = 32
"""Width and height in pixels: two macroblocks each way."""
_FRAMES = 10
_TIMESCALE = 1000
_FRAME_TICKS = 100
"""Each frame lasts 100 ms of the 1000-tick timescale: 10 frames a second."""
_PROFILE, _COMPAT, _LEVEL = 66, 0xC0, 10
"""Baseline (66) with constraint_set0 and 1 (Constrained Baseline), level 1."""


class _Bits:
    """An H.264 RBSP writer: fixed-width fields, Exp-Golomb codes, trailing bits."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, width: int, value: int) -> None:
        self.bits.extend((value >> shift) & 1 for shift in range(width - 1, -1, -1))

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(code.bit_length() - 1, 0)
        self.u(code.bit_length(), code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align_zero(self) -> None:
        while len(self.bits) % 8:
            self.bits.append(0)

    def raw(self, data: bytes) -> None:
        assert len(self.bits) % 8 == 0
        for byte in data:
            self.u(8, byte)

    def trailing(self) -> bytes:
        self.bits.append(1)
        self.align_zero()
        return bytes(int("".join(map(str, self.bits[index : index + 8])), 2) for index in range(0, len(self.bits), 8))


def _nal(header: int, rbsp: bytes) -> bytes:
    """A NAL unit: its header byte and the payload with emulation prevention (00 00 0x -> 00 00 03 0x)."""
    out = bytearray([header])
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps() -> bytes:
    bits = _Bits()
    bits.u(8, _PROFILE)
    bits.u(8, _COMPAT)
    bits.u(8, _LEVEL)
    bits.ue(0)  # seq_parameter_set_id
    bits.ue(0)  # log2_max_frame_num_minus4
    bits.ue(2)  # pic_order_cnt_type: output order is decoding order
    bits.ue(1)  # max_num_ref_frames
    bits.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    bits.ue(_SIDE // 16 - 1)  # pic_width_in_mbs_minus1
    bits.ue(_SIDE // 16 - 1)  # pic_height_in_map_units_minus1
    bits.u(1, 1)  # frame_mbs_only_flag
    bits.u(1, 1)  # direct_8x8_inference_flag
    bits.u(1, 0)  # frame_cropping_flag
    bits.u(1, 0)  # vui_parameters_present_flag
    return _nal(0x67, bits.trailing())


def _pps() -> bytes:
    bits = _Bits()
    bits.ue(0)  # pic_parameter_set_id
    bits.ue(0)  # seq_parameter_set_id
    bits.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    bits.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    bits.ue(0)  # num_slice_groups_minus1
    bits.ue(0)  # num_ref_idx_l0_default_active_minus1
    bits.ue(0)  # num_ref_idx_l1_default_active_minus1
    bits.u(1, 0)  # weighted_pred_flag
    bits.u(2, 0)  # weighted_bipred_idc
    bits.se(0)  # pic_init_qp_minus26
    bits.se(0)  # pic_init_qs_minus26
    bits.se(0)  # chroma_qp_index_offset
    bits.u(1, 1)  # deblocking_filter_control_present_flag
    bits.u(1, 0)  # constrained_intra_pred_flag
    bits.u(1, 0)  # redundant_pic_cnt_present_flag
    return _nal(0x68, bits.trailing())


def _frame(index: int, colour: tuple[int, int, int]) -> bytes:
    """One IDR picture: every macroblock I_PCM, a bright bar at a place that moves with index."""
    bar_luma, cb, cr = colour
    bar = (index * _SIDE) // _FRAMES
    bits = _Bits()
    bits.ue(0)  # first_mb_in_slice
    bits.ue(7)  # slice_type: I, as every slice of the picture
    bits.ue(0)  # pic_parameter_set_id
    bits.u(4, 0)  # frame_num (log2_max_frame_num = 4)
    bits.ue(index % 2)  # idr_pic_id: two IDR pictures in a row differ in it
    bits.u(1, 0)  # no_output_of_prior_pics_flag
    bits.u(1, 0)  # long_term_reference_flag
    bits.se(0)  # slice_qp_delta
    bits.ue(1)  # disable_deblocking_filter_idc: off (PCM needs none)
    mbs = _SIDE // 16
    for mb_y in range(mbs):
        for mb_x in range(mbs):
            bits.ue(25)  # mb_type I_PCM
            bits.align_zero()
            luma = bytes(
                bar_luma if abs(mb_x * 16 + x - bar) < 4 else 40 + mb_y * 16 + y for y in range(16) for x in range(16)
            )
            bits.raw(luma)  # samples 16..235: never 0, never an emulation pattern
            bits.raw(bytes([cb]) * 64 + bytes([cr]) * 64)
    return _nal(0x65, bits.trailing())


def _box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *parts)


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def make_mp4(path: str) -> bytes:
    """The MP4 the sandbox serves at path: the same bytes for the same path, every time."""
    digest = hashlib.sha256(path.encode()).digest()
    colour = (180 + digest[0] % 50, 16 + digest[1] % 220, 16 + digest[2] % 220)
    samples = [struct.pack(">I", len(nal)) + nal for nal in (_frame(i, colour) for i in range(_FRAMES))]
    sps, pps = _sps(), _pps()
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso2", b"avc1", b"mp41")
    mdat = _box(b"mdat", *samples)
    duration = _FRAMES * _FRAME_TICKS
    avcc = _box(
        b"avcC",
        bytes([1, _PROFILE, _COMPAT, _LEVEL, 0xFF, 0xE1]),
        struct.pack(">H", len(sps)),
        sps,
        bytes([1]),
        struct.pack(">H", len(pps)),
        pps,
    )
    name = b"batcher sandbox"
    avc1 = _box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),  # data_reference_index
        bytes(16),
        struct.pack(">HHIIIH", _SIDE, _SIDE, 0x480000, 0x480000, 0, 1),
        bytes([len(name)]) + name.ljust(31, b"\0"),
        struct.pack(">Hh", 0x18, -1),
        avcc,
    )
    stbl = _box(
        b"stbl",
        _full(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
        _full(b"stts", 0, 0, struct.pack(">III", 1, _FRAMES, _FRAME_TICKS)),
        _full(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, _FRAMES, 1)),
        _full(b"stsz", 0, 0, struct.pack(">II", 0, _FRAMES), *(struct.pack(">I", len(s)) for s in samples)),
        _full(b"stco", 0, 0, struct.pack(">II", 1, len(ftyp) + 8)),
    )
    minf = _box(
        b"minf",
        _full(b"vmhd", 0, 1, bytes(8)),
        _box(b"dinf", _full(b"dref", 0, 0, struct.pack(">I", 1), _full(b"url ", 0, 1))),
        stbl,
    )
    mdia = _box(
        b"mdia",
        _full(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, _TIMESCALE, duration, 0x55C4, 0)),  # 0x55C4: "und"
        _full(b"hdlr", 0, 0, struct.pack(">I", 0), b"vide", bytes(12), b"VideoHandler\0"),
        minf,
    )
    tkhd = _full(
        b"tkhd",
        0,
        3,  # enabled, in the movie
        struct.pack(">IIIII", 0, 0, 1, 0, duration),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0, 0),
        _MATRIX,
        struct.pack(">II", _SIDE << 16, _SIDE << 16),
    )
    mvhd = _full(
        b"mvhd",
        0,
        0,
        struct.pack(">IIIIIH", 0, 0, _TIMESCALE, duration, 0x10000, 0x100),
        bytes(10),
        _MATRIX,
        bytes(24),
        struct.pack(">I", 2),  # next_track_ID
    )
    moov = _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))
    return ftyp + mdat + moov
