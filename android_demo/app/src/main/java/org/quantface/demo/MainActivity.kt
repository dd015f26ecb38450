package org.quantface.demo

import android.content.ActivityNotFoundException
import android.content.Intent
import android.graphics.Color
import android.net.Uri
import android.os.Bundle
import android.view.Menu
import android.view.MenuItem
import android.view.View
import android.widget.Button
import android.widget.ProgressBar
import android.widget.TextView
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.activity.viewModels
import androidx.appcompat.app.AppCompatActivity
import androidx.core.content.FileProvider
import androidx.lifecycle.Lifecycle
import androidx.lifecycle.lifecycleScope
import androidx.lifecycle.repeatOnLifecycle
import kotlinx.coroutines.launch
import java.io.File

/** Pick or take a photo, restore its centre square on the device, compare before / after. */
class MainActivity : AppCompatActivity() {
    private val model: RestoreViewModel by viewModels()
    private var cameraUri: Uri? = null

    private val pickPhoto = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        if (uri != null) model.restore(uri)
    }

    private val takePhoto = registerForActivityResult(ActivityResultContracts.TakePicture()) { saved ->
        val uri = cameraUri
        if (saved && uri != null) model.restore(uri)
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        cameraUri = savedInstanceState?.getString(KEY_CAMERA_URI)?.let(Uri::parse)

        val status = findViewById<TextView>(R.id.status)
        val errorColor = Color.rgb(0xB0, 0x00, 0x20)
        val normalColor = status.currentTextColor
        findViewById<Button>(R.id.pick).setOnClickListener {
            pickPhoto.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
        }
        findViewById<Button>(R.id.camera).setOnClickListener { launchCamera() }

        lifecycleScope.launch {
            repeatOnLifecycle(Lifecycle.State.STARTED) {
                model.state.collect { s ->
                    findViewById<ProgressBar>(R.id.progress).visibility = if (s.busy) View.VISIBLE else View.INVISIBLE
                    findViewById<Button>(R.id.pick).isEnabled = !s.busy
                    findViewById<Button>(R.id.camera).isEnabled = !s.busy
                    findViewById<TextView>(R.id.model_info).text = s.modelInfo ?: ""
                    status.text = s.message ?: getString(R.string.hint)
                    status.setTextColor(if (s.isError) errorColor else normalColor)
                    findViewById<TextView>(R.id.latency).text = s.latency ?: ""
                    findViewById<BeforeAfterView>(R.id.compare).setImages(s.before, s.after)
                }
            }
        }
    }

    override fun onResume() {
        super.onResume()
        model.ensureModel() // first start, and back from Settings with another execution provider
    }

    override fun onSaveInstanceState(outState: Bundle) {
        super.onSaveInstanceState(outState)
        cameraUri?.let { outState.putString(KEY_CAMERA_URI, it.toString()) }
    }

    private fun launchCamera() {
        val file = File(cacheDir, "camera/photo.jpg").apply { parentFile?.mkdirs() }
        val uri = FileProvider.getUriForFile(this, "$packageName.files", file)
        cameraUri = uri
        try {
            takePhoto.launch(uri)
        } catch (e: ActivityNotFoundException) {
            findViewById<TextView>(R.id.status).text = getString(R.string.no_camera)
        }
    }

    override fun onCreateOptionsMenu(menu: Menu): Boolean {
        menuInflater.inflate(R.menu.main, menu)
        return true
    }

    override fun onOptionsItemSelected(item: MenuItem): Boolean = when (item.itemId) {
        R.id.action_settings -> {
            startActivity(Intent(this, SettingsActivity::class.java))
            true
        }
        else -> super.onOptionsItemSelected(item)
    }

    private companion object {
        const val KEY_CAMERA_URI = "camera_uri"
    }
}
