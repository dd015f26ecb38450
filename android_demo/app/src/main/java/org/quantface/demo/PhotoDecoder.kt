package org.quantface.demo

import android.content.ContentResolver
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.Matrix
import android.net.Uri
import androidx.exifinterface.media.ExifInterface
import java.io.IOException

/**
 * A picked or captured photo → an upright ARGB_8888 bitmap, the input of [FaceContract.cropResize].
 *
 * Large photos are decoded with a power-of-two `inSampleSize` that keeps the short side at least
 * [MIN_SHORT_SIDE_FACTOR] × the working size (a 12-megapixel photo would otherwise take ~48 MB): the
 * contract starts from this decoded bitmap, as the Python reference starts from the decoded array.
 */
object PhotoDecoder {
    private const val MIN_SHORT_SIDE_FACTOR = 4

    class PhotoError(message: String) : Exception(message)

    fun decode(resolver: ContentResolver, uri: Uri, workingSize: Int): Bitmap {
        val bounds = BitmapFactory.Options().apply { inJustDecodeBounds = true }
        open(resolver, uri).use { BitmapFactory.decodeStream(it, null, bounds) }
        if (bounds.outWidth <= 0 || bounds.outHeight <= 0) {
            throw PhotoError("This file is not a picture Android can decode.")
        }
        var sample = 1
        val shortSide = minOf(bounds.outWidth, bounds.outHeight)
        while (shortSide / (sample * 2) >= workingSize * MIN_SHORT_SIDE_FACTOR) sample *= 2
        val options = BitmapFactory.Options().apply {
            inSampleSize = sample
            inPreferredConfig = Bitmap.Config.ARGB_8888
        }
        val bitmap = open(resolver, uri).use { BitmapFactory.decodeStream(it, null, options) }
            ?: throw PhotoError("This picture could not be decoded.")
        val orientation = try {
            open(resolver, uri).use { ExifInterface(it).getAttributeInt(ExifInterface.TAG_ORIENTATION, ExifInterface.ORIENTATION_NORMAL) }
        } catch (e: IOException) {
            ExifInterface.ORIENTATION_NORMAL // no EXIF (PNG, WebP): already upright
        }
        return upright(bitmap, orientation)
    }

    private fun open(resolver: ContentResolver, uri: Uri) =
        resolver.openInputStream(uri) ?: throw PhotoError("The picture at $uri cannot be opened.")

    private fun upright(bitmap: Bitmap, orientation: Int): Bitmap {
        val m = Matrix()
        when (orientation) {
            ExifInterface.ORIENTATION_ROTATE_90 -> m.postRotate(90f)
            ExifInterface.ORIENTATION_ROTATE_180 -> m.postRotate(180f)
            ExifInterface.ORIENTATION_ROTATE_270 -> m.postRotate(270f)
            ExifInterface.ORIENTATION_FLIP_HORIZONTAL -> m.postScale(-1f, 1f)
            ExifInterface.ORIENTATION_FLIP_VERTICAL -> m.postScale(1f, -1f)
            ExifInterface.ORIENTATION_TRANSPOSE -> { m.postRotate(90f); m.postScale(-1f, 1f) }
            ExifInterface.ORIENTATION_TRANSVERSE -> { m.postRotate(270f); m.postScale(-1f, 1f) }
            else -> return bitmap
        }
        // Rotations by multiples of 90° and flips move pixels without resampling (filter off).
        val rotated = Bitmap.createBitmap(bitmap, 0, 0, bitmap.width, bitmap.height, m, false)
        if (rotated !== bitmap) bitmap.recycle()
        return rotated
    }
}
