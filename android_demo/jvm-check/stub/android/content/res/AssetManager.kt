// Stand-in for android.content.res.AssetManager so that the app's ModelManifest.kt compiles on the
// JVM (android_demo/jvm-check); the harness reads model.json from a file and never opens an asset.
package android.content.res

import java.io.FileNotFoundException
import java.io.InputStream

class AssetManager {
    fun open(name: String): InputStream = throw FileNotFoundException(name)
}
