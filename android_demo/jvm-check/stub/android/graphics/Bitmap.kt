package android.graphics

/** JVM stand-in for the few Bitmap members FaceContract uses: unpremultiplied ARGB ints, row-major. */
class Bitmap private constructor(val width: Int, val height: Int, private val pixels: IntArray) {
    enum class Config { ARGB_8888 }

    fun getPixels(dst: IntArray, offset: Int, stride: Int, x: Int, y: Int, w: Int, h: Int) {
        require(x >= 0 && y >= 0 && x + w <= width && y + h <= height) { "out of bounds" }
        for (r in 0 until h) System.arraycopy(pixels, (y + r) * width + x, dst, offset + r * stride, w)
    }

    companion object {
        fun createBitmap(colors: IntArray, width: Int, height: Int, config: Config): Bitmap =
            Bitmap(width, height, colors.copyOf())
    }
}
