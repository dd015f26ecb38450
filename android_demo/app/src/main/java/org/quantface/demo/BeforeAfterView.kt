package org.quantface.demo

import android.annotation.SuppressLint
import android.content.Context
import android.graphics.Bitmap
import android.graphics.Canvas
import android.graphics.Color
import android.graphics.Paint
import android.graphics.RectF
import android.util.AttributeSet
import android.util.TypedValue
import android.view.MotionEvent
import android.view.View

/**
 * A square view showing the input crop and the restored picture on top of each other, split by a
 * vertical line the user drags: before on the left of the line, restored on the right.
 */
class BeforeAfterView @JvmOverloads constructor(
    context: Context,
    attrs: AttributeSet? = null,
) : View(context, attrs) {

    private var before: Bitmap? = null
    private var after: Bitmap? = null
    private var split = 0.5f
    private val bitmapPaint = Paint(Paint.FILTER_BITMAP_FLAG)
    private val linePaint = Paint(Paint.ANTI_ALIAS_FLAG).apply { color = Color.WHITE; strokeWidth = 3f * resources.displayMetrics.density }
    private val labelPaint = Paint(Paint.ANTI_ALIAS_FLAG).apply {
        color = Color.WHITE
        textSize = TypedValue.applyDimension(TypedValue.COMPLEX_UNIT_SP, 14f, resources.displayMetrics)
        setShadowLayer(4f, 0f, 0f, Color.BLACK)
    }
    private val frame = RectF()

    fun setImages(before: Bitmap?, after: Bitmap?) {
        this.before = before
        this.after = after
        invalidate()
    }

    override fun onMeasure(widthMeasureSpec: Int, heightMeasureSpec: Int) {
        val width = MeasureSpec.getSize(widthMeasureSpec)
        setMeasuredDimension(width, width) // square, as the model's input and output
    }

    override fun onDraw(canvas: Canvas) {
        super.onDraw(canvas)
        val b = before ?: return
        frame.set(0f, 0f, width.toFloat(), height.toFloat())
        canvas.drawBitmap(b, null, frame, bitmapPaint)
        val x = split * width
        after?.let { a ->
            canvas.save()
            canvas.clipRect(x, 0f, width.toFloat(), height.toFloat())
            canvas.drawBitmap(a, null, frame, bitmapPaint)
            canvas.restore()
            canvas.drawLine(x, 0f, x, height.toFloat(), linePaint)
        }
        val pad = 8f * resources.displayMetrics.density
        canvas.drawText(context.getString(R.string.before), pad, height - pad, labelPaint)
        val label = context.getString(R.string.after)
        canvas.drawText(label, width - pad - labelPaint.measureText(label), height - pad, labelPaint)
    }

    @SuppressLint("ClickableViewAccessibility") // dragging only moves the split; nothing to click
    override fun onTouchEvent(event: MotionEvent): Boolean {
        if (after == null) return false
        when (event.actionMasked) {
            MotionEvent.ACTION_DOWN, MotionEvent.ACTION_MOVE -> {
                parent?.requestDisallowInterceptTouchEvent(true) // keep the ScrollView from stealing the drag
                split = (event.x / width).coerceIn(0f, 1f)
                invalidate()
                return true
            }
            MotionEvent.ACTION_UP, MotionEvent.ACTION_CANCEL -> {
                parent?.requestDisallowInterceptTouchEvent(false)
                return true
            }
        }
        return super.onTouchEvent(event)
    }
}
