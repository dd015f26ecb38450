// Runs the app's FaceContract (android_demo/app/.../FaceContract.kt) on the JVM for
// tests/test_package.py. Files are raw little-endian arrays:
//   ContractHarness <photo.rgba> <width> <height> <size> <output.f32> <output size> <out prefix>
// writes <prefix>.resized (size² ARGB ints), <prefix>.input (3·size² floats), <prefix>.argb.
import android.graphics.Bitmap
import org.quantface.demo.FaceContract
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

private fun write(path: String, ints: IntArray) {
    val b = ByteBuffer.allocate(ints.size * 4).order(ByteOrder.LITTLE_ENDIAN)
    ints.forEach { b.putInt(it) }
    File(path).writeBytes(b.array())
}

fun main(args: Array<String>) {
    val raw = File(args[0]).readBytes()
    val width = args[1].toInt()
    val height = args[2].toInt()
    val size = args[3].toInt()
    val argb = IntArray(width * height) { i ->
        val r = raw[i * 4].toInt() and 0xFF
        val g = raw[i * 4 + 1].toInt() and 0xFF
        val b = raw[i * 4 + 2].toInt() and 0xFF
        val a = raw[i * 4 + 3].toInt() and 0xFF
        (a shl 24) or (r shl 16) or (g shl 8) or b
    }
    val resized = FaceContract.cropResize(Bitmap.createBitmap(argb, width, height, Bitmap.Config.ARGB_8888), size)
    write(args[6] + ".resized", resized)
    val input = FaceContract.toInput(resized, size)
    val floats = ByteBuffer.allocate(input.capacity() * 4).order(ByteOrder.LITTLE_ENDIAN)
    for (i in 0 until input.capacity()) floats.putFloat(input.get(i))
    File(args[6] + ".input").writeBytes(floats.array())
    val output = ByteBuffer.wrap(File(args[4]).readBytes()).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
    write(args[6] + ".argb", FaceContract.toArgb(output, args[5].toInt()))
}
