package org.quantface.demo

import android.graphics.Bitmap
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer

/**
 * All pre/post-processing of the app, mirroring quantface/app_contract.py step for step with the
 * same integer and float32 arithmetic and the same rounding (the Python file explains the choices;
 * tests/test_package.py holds the Python side to `quantface restore --onnx`):
 *
 *  1. crop    the largest centred square: side = min(w, h), left = (w - side) / 2, top = (h - side) / 2
 *  2. resize  side × side → S × S by exact integer area averaging (Long arithmetic), ties to even
 *  3. input   NCHW float32 RGB, x = p / 127.5f - 1f
 *  4. output  clamp(y, -1, 1); v = (y + 1f) * 127.5f in float32; rounded half to even (Math.rint);
 *             opaque ARGB_8888 pixels
 *
 * The bitmap handed to [cropResize] is the decoded, upright photo (EXIF orientation applied by the
 * caller). Pixels with alpha < 255 are composited on white first: c' = (c·a + 255·(255 - a) + 127) / 255.
 */
object FaceContract {
    /** model.json "contract.version" this file implements. */
    const val VERSION = 1

    data class CropBox(val left: Int, val top: Int, val side: Int)

    /** Step 1. */
    fun cropBox(width: Int, height: Int): CropBox {
        require(width > 0 && height > 0) { "empty picture (${width}×$height)" }
        val side = minOf(width, height)
        return CropBox((width - side) / 2, (height - side) / 2, side)
    }

    /** Output cell i = [i·src, (i+1)·src) in units of 1/dst source pixel: first source pixel and the
     *  overlap weights of the source pixels it covers (they sum to src). */
    private class Cell(val k0: Int, val weights: LongArray)

    private fun areaWeights(src: Int, dst: Int): Array<Cell> = Array(dst) { i ->
        val lo = i.toLong() * src
        val hi = (i + 1).toLong() * src
        val k0 = lo / dst
        val k1 = (hi + dst - 1) / dst // exclusive
        Cell(k0.toInt(), LongArray((k1 - k0).toInt()) { t ->
            val k = k0 + t
            minOf(hi, (k + 1) * dst) - maxOf(lo, k * dst)
        })
    }

    private fun divRoundHalfEven(acc: Long, den: Long): Int {
        val q = acc / den
        val r = acc % den
        return (if (2 * r > den || (2 * r == den && q % 2 == 1L)) q + 1 else q).toInt()
    }

    private fun onWhite(c: Int, a: Int): Int = (c * a + 255 * (255 - a) + 127) / 255

    /**
     * Steps 1–2: the centre square of [bitmap] at [size] × [size], as opaque ARGB pixels (row-major).
     * Reads the photo one row at a time, so memory stays O(side + size²) whatever the photo's size.
     */
    fun cropResize(bitmap: Bitmap, size: Int): IntArray {
        require(size > 0) { "size must be positive" }
        val box = cropBox(bitmap.width, bitmap.height)
        val side = box.side
        val cells = areaWeights(side, size)
        val acc = LongArray(size * size * 3) // exact: at most 255·side²
        val rowSums = LongArray(size * 3)
        val row = IntArray(side)
        for (y in 0 until side) {
            bitmap.getPixels(row, 0, side, box.left, box.top + y, side, 1) // unpremultiplied ARGB
            for (j in 0 until size) {
                val cell = cells[j]
                var r = 0L
                var g = 0L
                var b = 0L
                for (t in cell.weights.indices) {
                    val p = row[cell.k0 + t]
                    val w = cell.weights[t]
                    val a = p ushr 24
                    if (a == 255) {
                        r += w * ((p shr 16) and 0xFF)
                        g += w * ((p shr 8) and 0xFF)
                        b += w * (p and 0xFF)
                    } else {
                        r += w * onWhite((p shr 16) and 0xFF, a)
                        g += w * onWhite((p shr 8) and 0xFF, a)
                        b += w * onWhite(p and 0xFF, a)
                    }
                }
                rowSums[j * 3] = r
                rowSums[j * 3 + 1] = g
                rowSums[j * 3 + 2] = b
            }
            // Output rows whose cell covers source row y (one or two when shrinking).
            val iLo = (y.toLong() * size / side).toInt()
            val iHi = minOf(size - 1, (((y + 1).toLong() * size - 1) / side).toInt())
            for (i in iLo..iHi) {
                val cell = cells[i]
                val t = y - cell.k0
                if (t < 0 || t >= cell.weights.size) continue
                val wy = cell.weights[t]
                if (wy == 0L) continue
                val o = i * size * 3
                for (n in 0 until size * 3) acc[o + n] += wy * rowSums[n]
            }
        }
        val den = side.toLong() * side
        return IntArray(size * size) { n ->
            val r = divRoundHalfEven(acc[n * 3], den)
            val g = divRoundHalfEven(acc[n * 3 + 1], den)
            val b = divRoundHalfEven(acc[n * 3 + 2], den)
            (0xFF shl 24) or (r shl 16) or (g shl 8) or b
        }
    }

    /** Step 3: size × size ARGB pixels → direct FloatBuffer (1, 3, size, size) in [-1, 1]. */
    fun toInput(argb: IntArray, size: Int): FloatBuffer {
        val plane = size * size
        require(argb.size == plane) { "expected $plane pixels, got ${argb.size}" }
        val x = ByteBuffer.allocateDirect(3 * plane * 4).order(ByteOrder.nativeOrder()).asFloatBuffer()
        for (n in 0 until plane) {
            val p = argb[n]
            x.put(n, ((p shr 16) and 0xFF) / 127.5f - 1f)
            x.put(plane + n, ((p shr 8) and 0xFF) / 127.5f - 1f)
            x.put(2 * plane + n, (p and 0xFF) / 127.5f - 1f)
        }
        return x
    }

    private fun toByte(y: Float): Int {
        val v = (y.coerceIn(-1f, 1f) + 1f) * 127.5f // float32, as numpy on float32 arrays
        return Math.rint(v.toDouble()).toInt() // half to even, as numpy.round
    }

    /** Step 4: the model's output (1, 3, size, size) → size × size opaque ARGB pixels. */
    fun toArgb(output: FloatBuffer, size: Int): IntArray {
        val plane = size * size
        require(output.capacity() >= 3 * plane) { "expected ${3 * plane} output values, got ${output.capacity()}" }
        return IntArray(plane) { n ->
            val r = toByte(output.get(n))
            val g = toByte(output.get(plane + n))
            val b = toByte(output.get(2 * plane + n))
            (0xFF shl 24) or (r shl 16) or (g shl 8) or b
        }
    }

    /** Pixels from [cropResize] or [toArgb] as a displayable bitmap. */
    fun toBitmap(argb: IntArray, size: Int): Bitmap =
        Bitmap.createBitmap(argb, size, size, Bitmap.Config.ARGB_8888)
}
