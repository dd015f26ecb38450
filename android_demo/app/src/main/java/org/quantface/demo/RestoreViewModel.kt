package org.quantface.demo

import android.app.Application
import android.graphics.Bitmap
import android.net.Uri
import android.os.SystemClock
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import androidx.preference.PreferenceManager
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import kotlinx.coroutines.withContext

/** Everything the screen shows; survives rotation. */
data class UiState(
    val busy: Boolean = false,
    val modelInfo: String? = null,
    val message: String? = null,
    val isError: Boolean = false,
    val before: Bitmap? = null,
    val after: Bitmap? = null,
    val latency: String? = null,
)

/**
 * Owns the ONNX Runtime session and runs photo → crop/resize → model → pixels off the main thread.
 * Every failure (no model, unsupported execution provider, undecodable photo, out of memory) ends
 * as a message in [UiState], never as a crash.
 */
class RestoreViewModel(application: Application) : AndroidViewModel(application) {
    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state

    private val lock = Mutex()

    @Volatile
    private var restorer: Restorer? = null

    private fun choice(): RuntimeChoice {
        val prefs = PreferenceManager.getDefaultSharedPreferences(getApplication())
        return RuntimeChoice(
            ExecutionProvider.fromSetting(prefs.getString("execution_provider", "CPU")),
            prefs.getInt("threads", 4).coerceIn(1, 8),
        )
    }

    /** The session for the current settings, (re)created when they changed. Call under [lock]. */
    private fun restorerForSettings(): Restorer {
        val wanted = choice()
        restorer?.let { if (it.choice == wanted) return it }
        restorer?.close()
        restorer = null
        return Restorer.load(getApplication<Application>(), wanted).also { restorer = it }
    }

    /** Loads the model, or reloads it after a settings change, and shows what it is; nothing to do
     *  while a restore runs (it uses the current settings) or when the session is current. */
    fun ensureModel() {
        val wanted = choice()
        if (_state.value.busy || restorer?.choice == wanted) return
        val app = getApplication<Application>()
        launchReporting(app.getString(R.string.loading_model, wanted.provider.label)) {
            val r = lock.withLock { withContext(Dispatchers.Default) { restorerForSettings() } }
            val hint = app.getString(R.string.hint)
            _state.update {
                it.copy(busy = false, modelInfo = describe(r), message = r.note?.let { note -> "$note\n$hint" } ?: hint,
                        isError = false)
            }
        }
    }

    fun restore(uri: Uri) = launchReporting(getApplication<Application>().getString(R.string.restoring)) {
        val app = getApplication<Application>()
        val result = lock.withLock {
            withContext(Dispatchers.Default) {
                val r = restorerForSettings()
                val size = r.manifest.workingSize
                val photo = PhotoDecoder.decode(app.contentResolver, uri, size)
                val t0 = SystemClock.elapsedRealtimeNanos()
                val before = FaceContract.cropResize(photo, size)
                val input = FaceContract.toInput(before, size)
                val t1 = SystemClock.elapsedRealtimeNanos()
                val (output, modelMillis) = r.run(input)
                val t2 = SystemClock.elapsedRealtimeNanos()
                val after = FaceContract.toArgb(output, size)
                val t3 = SystemClock.elapsedRealtimeNanos()
                val totalMillis = ((t1 - t0) + (t3 - t2)) / 1_000_000 + modelMillis
                val ep = if (r.choice.provider == ExecutionProvider.CPU) "CPU, ${r.choice.threads} threads"
                else app.getString(R.string.ep_note, r.providerLabel)
                UiState(
                    modelInfo = describe(r),
                    message = app.getString(R.string.done, photo.width, photo.height, size) + (r.note?.let { "\n$it" } ?: ""),
                    before = FaceContract.toBitmap(before, size),
                    after = FaceContract.toBitmap(after, size),
                    latency = app.getString(R.string.latency, modelMillis, totalMillis, ep),
                ).also { photo.recycle() }
            }
        }
        _state.value = result
    }

    private fun describe(r: Restorer): String {
        val m = r.manifest
        return getApplication<Application>().getString(
            R.string.model_info, m.modelFile, "%.1f MB".format(m.bytes / 1e6), m.profile, m.bitsSummary, m.toolVersion,
            r.providerLabel,
        )
    }

    private fun launchReporting(busyMessage: String, block: suspend () -> Unit) = viewModelScope.launch {
        _state.update { it.copy(busy = true, message = busyMessage, isError = false) }
        try {
            block()
        } catch (e: CancellationException) {
            throw e
        } catch (e: ModelError) {
            fail(e.message)
        } catch (e: PhotoDecoder.PhotoError) {
            fail(e.message)
        } catch (e: OutOfMemoryError) {
            fail("Out of memory: try a smaller photo.")
        } catch (e: Throwable) { // ONNX Runtime, I/O and anything unexpected: say it, do not crash
            fail("${e.javaClass.simpleName}: ${e.message}")
        }
    }

    private fun fail(message: String?) =
        _state.update { it.copy(busy = false, message = message ?: "Unknown error", isError = true) }

    override fun onCleared() {
        restorer?.close()
        restorer = null
    }
}
